"""train.save -> train.restore hands back everything a resumed run needs: the trained params,
the optimizer state, the step and skip counters, and the iteration (the task sampler's state is
(seed, iteration), and every PRNG key derives from the seed and the iteration)."""

import types

import jax
import numpy as np

from loopjax import train
from loopjax.checkpoint import Checkpointer
from update_fixtures import lora_update, make, one_device_mesh, random_batch


def _trainer(run_dir, state, resume):
    config = types.SimpleNamespace(resume=resume)
    return types.SimpleNamespace(config=config, state=state,
                                 ckpt=Checkpointer(str(run_dir), keep=2))


def test_restore_returns_the_saved_state_not_a_fresh_one(tmp_path):
    config = lora_update(minibatch_size=8, learning_rate=1e-2)
    fresh, step = make(config, one_device_mesh())
    fresh_host = jax.device_get(fresh.replace(base=None))
    state = fresh
    for seed in range(3):  # Adam moments, step count and grad-norm statistics all move
        state, _ = step(state, random_batch(seed))
    state, _ = step(state, random_batch(5).replace(
        logp_old_UxBxT=np.full((1, 8, 16), np.nan, np.float32)))  # one NaN skip
    saved = jax.device_get(state.replace(base=None))
    assert int(saved.step) == 3 and int(saved.nan_skips) == 1

    writer = _trainer(tmp_path, state, resume=False)
    train.save(writer, 3, {"before": {"dev": {"tgc": 0.5}}})
    writer.ckpt.close()

    # A new process: its state is freshly initialized, then restored.
    again, _ = make(config, one_device_mesh())
    reader = _trainer(tmp_path, again, resume=True)
    meta = train.restore(reader)
    reader.ckpt.close()
    assert meta == {"before": {"dev": {"tgc": 0.5}}, "iteration": 3}
    got = jax.device_get(reader.state.replace(base=None))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, saved)
    # ... and the saved state really differs from a fresh one everywhere that matters.
    for name in ("trainable", "opt_state", "step", "nan_skips", "gnorm_mean"):
        leaves = zip(jax.tree.leaves(getattr(saved, name)),
                     jax.tree.leaves(getattr(fresh_host, name)), strict=True)
        assert any(not np.array_equal(a, b) for a, b in leaves), name
    # the frozen base comes from the model, not the checkpoint
    assert reader.state.base is again.base


def test_no_resume_means_no_restore(tmp_path):
    state, _ = make(lora_update(minibatch_size=8), one_device_mesh())
    writer = _trainer(tmp_path, state, resume=False)
    train.save(writer, 1, {})
    assert train.restore(writer) is None and writer.state is state
    writer.ckpt.close()

"""The jitted, sharded, donated update step and the epoch driver on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_rollout
from loopjax.config import EpochConfig, UpdateConfig
from loopjax.loop import advantages
from loopjax.loop import epochs as epochs_module
from loopjax.loop.epochs import minibatch_plan, run_iteration
from loopjax.loop.update import OUTLIER_WARMUP, split_params
from loopjax.models.transformer import forward, token_logprobs
from loopjax.sharding import make_mesh
from update_fixtures import (
    CFG,
    assert_trees_close,
    lora_update,
    make,
    one_device_mesh,
    random_batch,
    random_rollouts,
    run_steps,
    shared_prompt_rollouts,
)


def test_mesh_2x2x2_matches_one_device(level="token"):
    """AdamW steps, optimizer state sharded over the mesh, equal one device's. (Adam is blind to a
    gradient's scale: test_update_gradient.py checks the gradient itself on every path.)"""
    # A small learning rate: Adam turns tiny reduction-order differences of near-zero gradients
    # into full-size steps, which would hide a real mismatch behind tolerance noise.
    config = lora_update(level=level, minibatch_size=8, microbatch_size=4, learning_rate=1e-3)
    batches = [random_batch(s, microbatches=2) for s in range(2)]
    one, m1 = run_steps(config, one_device_mesh(), batches)
    eight, m8 = run_steps(config, make_mesh("2,2,2"), batches)
    assert_trees_close(one, eight)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a["applied"] and b["applied"]


def test_full_weights_mode_trains_params():
    config = UpdateConfig(minibatch_size=8, train_full_weights=True, learning_rate=1e-2)
    state, step = make(config, one_device_mesh())
    before = np.asarray(state.params["embed"])
    state, m = step(state, random_batch(4))
    assert state.base is None and bool(m["applied"])
    assert not np.allclose(before, np.asarray(state.params["embed"]))


def test_nan_loss_skips_step_and_counts():
    state, step = make(lora_update(minibatch_size=8), one_device_mesh())
    before = jax.device_get(state.trainable)
    bad = random_batch(5)
    bad = bad.replace(logp_old_UxBxT=np.where(bad.mask_UxBxT, np.nan, 0.0).astype(np.float32))
    state, m = step(state, bad)
    assert not bool(m["applied"]) and bool(m["nan_skipped"])
    assert int(state.nan_skips) == 1 and int(state.step) == 0
    assert_trees_close(before, jax.device_get(state.trainable), rtol=0, atol=0)
    state, m = step(state, random_batch(5))
    assert bool(m["applied"]) and int(state.step) == 1 and int(state.nan_skips) == 1


def test_outlier_gradient_is_skipped():
    config = lora_update(minibatch_size=8, skip_outlier_grads=True)
    state, step = make(config, one_device_mesh())
    normal = random_batch(6)
    for _ in range(OUTLIER_WARMUP):
        state, m = step(state, normal)
        assert bool(m["applied"])
    huge = normal.replace(adv_UxB=normal.adv_UxB * 1e4)
    state, m = step(state, huge)
    assert bool(m["outlier_skipped"]) and not bool(m["applied"])
    assert int(state.outlier_skips) == 1 and int(state.step) == OUTLIER_WARMUP


def test_one_copy_of_base_weights():
    state, step = make(lora_update(minibatch_size=8), make_mesh("2,2,2"))
    embed = state.base["embed"]
    for s in range(2):
        state, _ = step(state, random_batch(s))
    assert state.base["embed"] is embed and not embed.is_deleted()
    # The optimizer state mirrors the adapter only.
    opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
    assert embed.shape not in opt_shapes
    live = [x for x in jax.live_arrays() if x.shape == embed.shape and x.dtype == embed.dtype]
    assert len(live) == 1


def test_compiles_once_per_bucket_and_row_count():
    state, step = make(lora_update(minibatch_size=8), one_device_mesh(), fresh=True)
    epoch = EpochConfig(epochs_per_iteration=1, buckets=(8, 16, 32))
    length_ranges = [(3, 8), (9, 16), (17, 30), (3, 30)]
    history = []
    for it in range(10):  # 10 iterations x 2 minibatches = 20 steps
        lo, hi = length_ranges[it % len(length_ranges)]
        rollouts = random_rollouts(it, 16, min_len=lo, max_len=hi)
        adv = np.random.default_rng(it).normal(size=16).astype(np.float32)
        state, h = run_iteration(step, state, rollouts, adv, jax.random.key(it), epoch)
        history += h
    assert len(history) == 20
    assert {m["T"] for m in history} == {8, 16, 32}
    shapes = {(m["rows"], m["T"]) for m in history}
    # Packed rows come in quarters of the minibatch: at most 4 row counts per bucket.
    assert {r for r, _ in shapes} <= {2, 4, 6, 8} and min(r for r, _ in shapes) < 8
    assert step.num_compiles() == len(shapes) <= 12



@pytest.mark.parametrize("behaviour", ["far_above", "far_below", "near"])
def test_kl_stop_ends_iteration(behaviour):
    """|kl_k1| > 20 ends the iteration after the step that measured it, whichever its sign; a
    near-policy iteration runs all its planned steps (2 epochs x 32 rollouts / 8 = 8)."""
    state, step = make(lora_update(minibatch_size=8), one_device_mesh())
    rollouts = random_rollouts(8, 32, min_len=20, max_len=30)
    # The policy is near uniform (log-prob about -4.2): behaviour log-probs of -0.01 give log w
    # << -20 per rollout (kl_k1 > 20), of -20 give log w >> 20 (kl_k1 < -20).
    old = {"far_above": -0.01, "far_below": -20.0, "near": None}[behaviour]
    for r in rollouts:
        if old is not None:
            r.logp = np.where(r.is_output, old, 0.0).astype(np.float32)
    adv = np.ones(32, np.float32)
    state, history = run_iteration(step, state, rollouts, adv, jax.random.key(0),
                                   EpochConfig(buckets=(32,)))
    if behaviour == "near":
        assert len(history) == 8 and not any(m["stopped_on_kl"] for m in history)
        assert max(abs(m["kl_k1"]) for m in history) < 5
    else:
        assert len(history) == 1 and history[0]["stopped_on_kl"]
        assert (history[0]["kl_k1"] > 20) == (behaviour == "far_above")


@pytest.mark.parametrize("epochs", [1, 2])
def test_too_many_nan_skips_abort(monkeypatch, epochs):
    """More than MAX_NAN_SKIPS skipped steps abort training; exactly MAX_NAN_SKIPS do not."""
    monkeypatch.setattr(epochs_module, "MAX_NAN_SKIPS", 2)
    state, step = make(lora_update(minibatch_size=8), one_device_mesh())
    rollouts = random_rollouts(9, 16)
    for r in rollouts:
        r.logp = np.where(r.is_output, np.nan, 0.0).astype(np.float32)
    config = EpochConfig(epochs_per_iteration=epochs, buckets=(16,))
    adv = np.ones(16, np.float32)
    if epochs == 1:  # 2 steps, both skipped: at the limit, not over it
        state, history = run_iteration(step, state, rollouts, adv, jax.random.key(0), config)
        assert [m["nan_skips"] for m in history] == [1, 2] and int(state.step) == 0
    else:  # 4 planned steps: the third skip aborts
        with pytest.raises(RuntimeError, match="^3 update steps had a non-finite"):
            run_iteration(step, state, rollouts, adv, jax.random.key(0), config)


def test_minibatch_plan_drops_signal_free_rollouts():
    """Rollouts with |A| < min_abs (and A <= 0 with positive_only) never reach a minibatch; the
    others appear exactly once per epoch, in minibatches of at most M."""
    adv = np.array([0.5, -0.005, 0.0, -0.4, 0.009, 0.01, -0.01, 1.0, 0.3, -2.0], np.float32)
    for positive_only, want in ((False, [0, 3, 5, 6, 7, 8, 9]), (True, [0, 5, 7, 8])):
        plan = minibatch_plan(adv, np.full(10, 5), jax.random.key(0), minibatch_size=3, epochs=2,
                              min_abs=0.01, positive_only=positive_only)
        flat = np.concatenate(plan)
        assert all(len(p) <= 3 for p in plan)
        half = len(flat) // 2
        assert sorted(flat[:half]) == sorted(flat[half:]) == want


def test_run_iteration_shares_prompts_when_asked():
    """EpochConfig.share_prefix reaches the packer: the same rollouts take fewer held tokens per
    step (each task's prompt once), in rows long enough for a whole task's tree (a bucket of 64
    where the longest rollout needs 32), and the step's loss is the unshared step's."""
    rollouts = shared_prompt_rollouts()
    adv = np.array([1.0, -0.5, 0.7, 0.4, -0.9, 0.3], np.float32)
    out = {}
    for share in (False, True):
        state, step = make(lora_update(minibatch_size=8), one_device_mesh())
        _, history = run_iteration(step, state, rollouts, adv, jax.random.key(0),
                                   EpochConfig(epochs_per_iteration=1, buckets=(32, 64),
                                               share_prefix=share))
        out[share] = history[0]
    assert out[True]["held_tokens"] == out[False]["held_tokens"] - 2 * 8 - 6
    assert (out[False]["T"], out[True]["T"]) == (32, 64)
    np.testing.assert_allclose(out[True]["loss"], out[False]["loss"], rtol=1e-5)


def test_minibatch_plan_keeps_tasks_together():
    """With groups (share_prefix), each task's kept rollouts are listed together, every kept
    rollout once per epoch, and the task order is reshuffled between epochs."""
    groups = np.repeat(np.arange(8), 3)
    adv = np.where(np.arange(24) % 5 == 0, 0.0, 1.0).astype(np.float32)  # some dropped
    plan = minibatch_plan(adv, np.full(24, 5), jax.random.key(1), minibatch_size=6, epochs=2,
                          min_abs=0.01, positive_only=False, groups_N=groups)
    flat = np.concatenate(plan)
    half = len(flat) // 2
    kept = np.flatnonzero(adv)
    for epoch in (flat[:half], flat[half:]):
        assert sorted(epoch) == kept.tolist()
        order = groups[epoch]
        assert np.all(np.diff(np.flatnonzero(np.diff(order) != 0)) > 0)  # runs, not interleaved
        assert len(np.unique(order)) == np.sum(np.diff(order) != 0) + 1  # each task one run
    assert groups[flat[:half]].tolist() != groups[flat[half:]].tolist()


# --------------------------------------------------------------------------- learning on a toy task

PROMPT, REPLY = 2, 3
TARGET = 8  # reward = share of reply tokens below TARGET: about 1/8 for a uniform policy


@functools.partial(jax.jit, static_argnums=(3,))
def sample(params, lora, key, num):
    """Prompt tokens drawn from [TARGET, V), then REPLY tokens sampled at temperature 1."""
    k_prompt, key = jax.random.split(key)
    tokens = jnp.zeros((num, PROMPT + REPLY), jnp.int32)
    tokens = tokens.at[:, :PROMPT].set(
        jax.random.randint(k_prompt, (num, PROMPT), TARGET, CFG.vocab_size))
    target_mass = jnp.zeros((num,))
    for t in range(PROMPT, PROMPT + REPLY):
        logits = forward(CFG, params, tokens, lora=lora)[:, t - 1]
        probs = jax.nn.softmax(logits)
        target_mass += jnp.sum(probs[:, :TARGET], axis=-1) / REPLY
        key, k = jax.random.split(key)
        tokens = tokens.at[:, t].set(jax.random.categorical(k, logits))
    logp = token_logprobs(CFG, params, tokens, lora=lora)
    reward = jnp.mean(tokens[:, PROMPT:] < TARGET, axis=1)
    return tokens, logp, reward, target_mass


def expected_reward(state):
    _, _, _, mass = sample(*split_params(state.trainable, state.base), jax.random.key(123), 1024)
    return float(jnp.mean(mass))


@pytest.mark.parametrize("name", ["loop", "rloo", "grpo"])
def test_learning_raises_expected_reward(name):
    G, K = 8, 4
    settings = dict(
        loop=(lora_update(learning_rate=1e-2), "leave_one_out", False, 2),
        rloo=(lora_update(clip_form=None, learning_rate=1e-2), "leave_one_out", False, 1),
        grpo=(lora_update(learning_rate=1e-2), "leave_none_out", True, 1))
    config, baseline, norm, epochs = settings[name]
    # The LoRA adapter moves the final hidden state, whose RMS is pinned at 1; with init_params'
    # 0.02-scale unembedding, logits could then never move by more than ~0.6. A 10x unembedding
    # gives the adapter room (a pretrained model's unembedding is far from 0.02-scale too).
    state, step = make(config, one_device_mesh(), unembed_scale=10.0)
    before = expected_reward(state)
    key = jax.random.key(7)
    is_output = np.arange(PROMPT + REPLY) >= PROMPT
    for _ in range(10):
        key, k_sample, k_shuffle = jax.random.split(key, 3)
        tokens, logp, reward, _ = jax.device_get(sample(state.params, state.trainable, k_sample, G * K))  # noqa: E501 (the file is past the 400-line limit: no wrapping)
        adv = np.asarray(advantages(reward.reshape(G, K), baseline, norm)).reshape(-1)
        rollouts = [as_rollout(tokens[i], is_output, logp[i], np.zeros(PROMPT + REPLY, np.int32))
                    for i in range(G * K)]
        state, history = run_iteration(step, state, rollouts, adv, k_shuffle,
                                       EpochConfig(epochs_per_iteration=epochs, buckets=(8,)))
        if name != "loop":  # strictly on-policy: every step sees the sampling policy
            assert all(abs(m["kl_k1"]) < 1e-4 for m in history)
    after = expected_reward(state)
    assert after > before + 0.25, (before, after)

"""A refactor check for the update step: the same fixed batches through the step of two trees.

    git worktree add --detach /tmp/before 21dc734
    PYTHONPATH=/tmp/before python benchmarks/update_equivalence.py save /tmp/before.npz
    python benchmarks/update_equivalence.py save /tmp/after.npz
    python benchmarks/update_equivalence.py compare /tmp/before.npz /tmp/after.npz

`save` packs 16 fixed rollouts and takes one update step on six paths (one device unpacked;
4 microbatches packed, turn level; the 2x2x2 mesh packed; the mesh with full weights at
trajectory level; the mesh unpacked; 8 microbatches with full weights) and stores the loss,
grad_norm, kl_k1, clip fraction and every new trainable array. It runs on trees from before the
microbatch-major Batch (5204cb3) too. `compare` prints one JSON line with the largest absolute
difference (0.0 = bit-identical).
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

if sys.argv[1:2] == ["compare"]:
    a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
    assert set(a) == set(b), "the two files hold different arrays"
    worst = max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)
    print(json.dumps({"benchmark": "update_equivalence", "arrays": len(a), "max_abs_diff": worst}))
    sys.exit(0)
from loopjax.loop import epochs as E  # noqa: E402
from loopjax.loop import update as U  # noqa: E402
from loopjax.models.config import ModelConfig  # noqa: E402
from loopjax.models.transformer import init_params  # noqa: E402
from loopjax.sharding import make_mesh  # noqa: E402

NEW = not hasattr(E, "forward_rows")  # the tree has loopjax/rollout/batch.py
if NEW:
    from loopjax.config import LoraConfig, UpdateConfig  # noqa: E402
    from loopjax.rollout.batch import Rollout, pack_minibatch  # noqa: E402
else:
    from loopjax.loop.epochs import pack_minibatch  # noqa: E402
    from loopjax.loop.update import UpdateConfig  # noqa: E402
    from loopjax.models.lora import LoraConfig  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
# name: (mesh, microbatch_size, packed, level, full weights)
PATHS = {"single": ("1,1,1", 0, False, "token", False),
         "micro_packed": ("1,1,1", 4, True, "turn", False),
         "mesh": ("2,2,2", 4, True, "token", False),
         "mesh_full": ("2,2,2", 4, True, "trajectory", True),
         "mesh_unpacked": ("2,2,2", 0, False, "token", False),
         "micro8": ("1,1,1", 2, True, "token", True)}


def fixed_rollouts():
    """16 rollouts of 8-29 tokens, the last two thirds generated in two turns, and advantages."""
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(16):
        n = int(rng.integers(8, 30))
        out = np.arange(n) >= n // 3
        arrays.append(dict(tokens=rng.integers(0, 64, n).astype(np.int32), is_output=out,
                           logp=np.where(out, -4.0 + 0.3 * rng.standard_normal(n),
                                         0).astype(np.float32),
                           turn_id=np.where(out, 1 + (np.arange(n) > 2 * n // 3),
                                            0).astype(np.int32)))
    adv = rng.standard_normal(16).astype(np.float32)
    adv[3] = 0.0  # one filtered rollout
    if NEW:
        return [Rollout(**a, reward=0.0, success=False, task_id="t", group=0) for a in arrays], adv
    return arrays, adv


def save(path):
    res = {}
    for name, (mesh_s, micro, pack, level, full) in PATHS.items():
        mesh = make_mesh(mesh_s) if mesh_s == "2,2,2" else jax.sharding.Mesh(
            np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        uc = UpdateConfig(level=level, minibatch_size=16, microbatch_size=micro,
                          train_full_weights=full, learning_rate=1e-2, lora=LoraConfig(rank=4))
        state = U.init_train_state(CFG, uc, init_params(CFG, jax.random.key(0)), jax.random.key(1),
                                   mesh)
        if not full:  # a non-zero LoRA B, so that A's gradient is not zero
            state = state.replace(trainable=jax.tree.map(lambda x: x + 0.01, state.trainable))
        step = U.make_update_step(CFG, uc, mesh, state)
        kw = {"microbatches" if NEW else "groups": uc.num_microbatches}
        rollouts, adv = fixed_rollouts()
        batch = pack_minibatch(rollouts, adv, 16, 32, pack=pack,
                               multiple=4 if mesh_s == "2,2,2" else 1, **kw)
        state, m = step(state, batch)
        for k in ("loss", "grad_norm", "kl_k1", "clip_fraction"):
            res[f"{name}/{k}"] = np.asarray(m[k])
        for i, leaf in enumerate(jax.tree.leaves(state.trainable)):
            res[f"{name}/param{i}"] = np.asarray(leaf)
    np.savez(path, **res)
    print(json.dumps({"benchmark": "update_equivalence", "saved": path, "arrays": len(res)}))


if __name__ == "__main__":
    save(sys.argv[2])

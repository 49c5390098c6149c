"""A tiny policy, random rollouts (and rollouts sharing their prompts) and a cache of update
steps, for the update and packer tests."""

import jax
import numpy as np

from conftest import as_rollout
from loopjax.config import UpdateConfig
from loopjax.loop.update import init_train_state, make_update_step
from loopjax.models.config import ModelConfig
from loopjax.models.transformer import init_params
from loopjax.rollout.batch import pack_minibatch
from loopjax.sharding import make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def lora_update(**overrides) -> UpdateConfig:
    """An update of a LoRA adapter at the paper's learning rate unless `overrides` say otherwise
    (UpdateConfig's defaults train the default run's scratch model in full)."""
    return UpdateConfig(**{"train_full_weights": False, "learning_rate": 5e-5, **overrides})


def one_device_mesh():
    return make_mesh("1,1,1", devices=jax.devices()[:1])


def random_rollouts(seed, n, min_len=4, max_len=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(min_len, max_len + 1))
        is_output = rng.random(T) < 0.6
        is_output[0] = False
        out.append(as_rollout(tokens=rng.integers(0, CFG.vocab_size, T),
                              is_output=is_output,
                              logp=np.where(is_output, -rng.uniform(3.5, 4.5, T), 0.0),
                              turn_id=np.sort(rng.integers(0, 3, T))))
    return out


def shared_prompt_rollouts(seed=5):
    """Three tasks' rollouts (groups 0, 0, 0, 1, 1, 2): each task's rollouts begin with the same
    prompt, then take turns of generated tokens and observations of their own. Two of task 0's
    rollouts also begin their answer with the same two tokens (the common prefix reaches into
    generated tokens, which a tree must not share)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, CFG.vocab_size, n) for n in (9, 7, 8)]
    first_answer = rng.integers(0, CFG.vocab_size, 2)
    out = []
    for i, g in enumerate([0, 0, 0, 1, 1, 2]):
        tokens, is_output, turn = ([prompts[g]], [np.zeros(len(prompts[g]), bool)],
                                   [np.zeros(len(prompts[g]), int)])
        for t in range(int(rng.integers(1, 3))):
            answer = rng.integers(0, CFG.vocab_size, int(rng.integers(2, 5)))
            if i < 2 and t == 0:
                answer = np.concatenate([first_answer, answer])
            observation = rng.integers(0, CFG.vocab_size, int(rng.integers(1, 3)))
            tokens += [answer, observation]
            is_output += [np.ones(len(answer), bool), np.zeros(len(observation), bool)]
            turn += [np.full(len(answer), t), np.full(len(observation), t)]
        tokens, is_output = np.concatenate(tokens), np.concatenate(is_output)
        out.append(as_rollout(tokens=tokens, is_output=is_output, logp=np.zeros(len(tokens)),
                              turn_id=np.concatenate(turn), group=g))
    return out


def random_batch(seed, rows=8, length=16, microbatches=1):
    rollouts = random_rollouts(seed, rows)
    adv = np.random.default_rng(seed + 100).normal(size=rows).astype(np.float32)
    return pack_minibatch(rollouts, adv, rows, length, microbatches=microbatches)


_STEPS = {}


def make(config, mesh, seed=0, unembed_scale=1.0, fresh=False):
    """A new TrainState and an update step; steps are shared by tests with the same config and
    mesh shape (a fresh state each time), so each compiles once per test session."""
    params = init_params(CFG, jax.random.key(seed))
    params["unembed"] = params["unembed"] * unembed_scale
    state = init_train_state(CFG, config, params, jax.random.key(seed + 1), mesh)
    key = (config, tuple(mesh.shape.items()))
    if fresh or key not in _STEPS:
        _STEPS[key] = make_update_step(CFG, config, mesh, state)
    return state, _STEPS[key]


def run_steps(config, mesh, batches):
    state, step = make(config, mesh)
    metrics = []
    for b in batches:
        state, m = step(state, jax.device_put(b, step.batch_sharding))
        metrics.append(jax.device_get(m))
    return jax.device_get(state.trainable), metrics


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)

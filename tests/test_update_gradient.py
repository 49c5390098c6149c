"""The update step's gradient, scale included, against a plain per-rollout reference.

Adam and the global-norm clip are blind to a gradient's scale, so these tests swap the optimizer for
plain SGD at learning rate 1 (params_after = params_before - grad): the step's parameter change is
then its gradient, which is compared with `jax.grad` of a loss written out here rollout by rollout
(one unpadded forward pass per rollout, the |A| filter and the fixed denominator M by hand). The
same check runs on one device, with microbatch accumulation, packed rows and the 2x2x2 mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import as_rollout
from loopjax.config import EpochConfig, LoraConfig, UpdateConfig
from loopjax.loop import update as update_module
from loopjax.loop.epochs import run_iteration
from loopjax.loop.update import init_train_state, make_update_step, split_params
from loopjax.models.lora import init_lora
from loopjax.models.transformer import init_params, token_logprobs
from loopjax.rollout.batch import pack_minibatch
from loopjax.sharding import make_mesh
from update_fixtures import (
    CFG,
    lora_update,
    make,
    one_device_mesh,
    random_rollouts,
    shared_prompt_rollouts,
)

M = 8  # minibatch slots; 6 hold rollouts, 2 are empty (weight 0), so the denominator M != kept
MIN_ABS = 0.3  # the |A| filter threshold these tests use; rollout 2 (|A| = 0.2) falls below it
ADV = np.array([1.3, -0.8, 0.2, 0.9, -1.1, 0.6], np.float32)
LO, HI = 1 / 1.1, 1.1  # the reference clip form at eps 0.1


def _rollouts(shared=False):
    rollouts = shared_prompt_rollouts() if shared else random_rollouts(21, len(ADV), min_len=5,
                                                                         max_len=14)
    for i, r in enumerate(rollouts):  # old log-probs near the policy's (about -log 64) +- 0.3
        r.logp = np.where(r.is_output, -np.log(CFG.vocab_size) + 0.3 * np.sin(np.arange(
            len(r.tokens)) + i), 0.0).astype(np.float32)
    return rollouts


def _sgd(config):
    return optax.sgd(1.0)


def _params():
    params = init_params(CFG, jax.random.key(0))
    params["unembed"] = params["unembed"] * 10.0  # policy far from uniform: ratios get clipped
    return params


def _surrogate(log_ratio, a):
    ratio = jnp.exp(log_ratio)
    return jnp.minimum(ratio * a, jnp.clip(ratio, LO, HI) * a)


@functools.cache
def reference_grad(full_weights, level, positive_only, shared=False):
    """d/d trainable of -(1/M) * sum over the kept rollouts of their mean clipped surrogate, at
    the trainable params every sgd_step starts from; ratios per token, per turn (the product over
    the turn's generated tokens) or per trajectory."""
    trainable, base = _initial(full_weights)
    rollouts = _rollouts(shared)

    def loss(trainable):
        params, lora = split_params(trainable, base)
        total = 0.0
        for r, a in zip(rollouts, ADV, strict=True):
            if abs(a) < MIN_ABS or (positive_only and a <= 0):
                continue
            logp = token_logprobs(CFG, params, jnp.asarray(r.tokens)[None], lora=lora)[0]
            out = np.flatnonzero(r.is_output)
            log_ratio = logp[out] - r.logp[out]
            if level == "token":
                total += jnp.mean(_surrogate(log_ratio, a))
            elif level == "turn":
                turns = r.turn_id[out]
                total += jnp.mean(jnp.stack([_surrogate(jnp.sum(log_ratio[turns == j]), a)
                                             for j in np.unique(turns)]))
            else:
                total += _surrogate(jnp.sum(log_ratio), a)
        return -total / M
    # On the host: a cached device array would outlive the test (test_loop_update.py counts them).
    return jax.device_get(jax.jit(jax.grad(loss))(trainable))


def _initial(full_weights):
    """(trainable, base) on the host, as every test here starts from them."""
    params = init_params(CFG, jax.random.key(0))
    params["unembed"] = params["unembed"] * 10.0  # policy far from uniform: ratios get clipped
    # host copies: the update step donates (and so deletes) its input
    params = jax.device_get(params)
    if full_weights:
        return params, None
    lora = init_lora(CFG, LoraConfig(), jax.random.key(1))
    # LoRA's B starts at 0, which makes A's gradient 0: start from a non-zero B.
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), lora)
    return jax.device_get(lora), params


def sgd_step(monkeypatch, config, mesh, pack, share=False):
    """(trainable before, trainable after one SGD step at lr 1, metrics) from `_initial`; with
    `share`, on `shared_prompt_rollouts` packed as trees (pack_minibatch(share_prefix=True))."""
    monkeypatch.setattr(update_module, "make_optimizer", lambda config: optax.sgd(1.0))
    trainable, base = _initial(config.train_full_weights)
    state = init_train_state(CFG, config, trainable if base is None else base, jax.random.key(1),
                             mesh)
    if base is not None:
        state = state.replace(trainable=jax.device_put(trainable, jax.tree.map(
            lambda x: x.sharding, state.trainable)))
    step = make_update_step(CFG, config, mesh, state)
    batch = pack_minibatch(_rollouts(share), ADV, M, 32 if share else 16, pack=pack,
                           microbatches=config.num_microbatches,
                           multiple=mesh.shape["data"] * mesh.shape["fsdp"], share_prefix=share)
    state, metrics = step(state, batch)
    return trainable, jax.device_get(state.trainable), jax.device_get(metrics)


PATHS = {  # name: (level, mesh, microbatch_size, packed rows, full weights, adv_positive_only,
    #               a task's rollouts packed as a tree with their prompt once)
    "one_device": ("token", "1,1,1", 0, False, False, False, False),
    "one_device_microbatches_packed": ("turn", "1,1,1", 2, True, False, False, False),
    "mesh_2x2x2_microbatches": ("token", "2,2,2", 4, False, False, False, False),
    "mesh_2x2x2_turn_packed": ("turn", "2,2,2", 2, True, False, False, False),
    "mesh_2x2x2_full_weights_trajectory_positive":
        ("trajectory", "2,2,2", 0, True, True, True, False),
    "shared_prefix_token": ("token", "1,1,1", 0, True, False, False, True),
    "shared_prefix_turn_microbatches": ("turn", "1,1,1", 2, True, False, False, True),
    "shared_prefix_mesh_2x2x2_full_weights_trajectory":
        ("trajectory", "2,2,2", 0, True, True, False, True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_sgd_step_is_the_reference_gradient(monkeypatch, path):
    level, mesh_shape, micro, pack, full, positive, share = PATHS[path]
    config = UpdateConfig(level=level, minibatch_size=M, microbatch_size=micro, remat=micro > 0,
                          adv_min_abs=MIN_ABS, adv_positive_only=positive, train_full_weights=full)
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:8 if mesh_shape == "2,2,2" else 1])
    before, after, metrics = sgd_step(monkeypatch, config, mesh, pack, share)
    want = reference_grad(full, level, positive, share)
    got = jax.tree.map(lambda b, a: b - a, before, after)
    norm = float(optax.tree.norm(want))
    assert norm > 1e-3  # a gradient worth comparing
    # fp32: the step's gradient and the reference differ by reduction order only (measured
    # <= 1.5e-7 of the norm on this CPU, 70x below atol); a gradient scaled by 1.125 is off by
    # about 0.1 of the norm.
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5 * norm, rtol=1e-4),
                 got, want)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    kept = (np.abs(ADV) >= MIN_ABS) & ((ADV > 0) | (not positive))
    assert bool(metrics["applied"]) and metrics["num_rollouts"] == kept.sum()


def test_multi_device_programs_are_never_read_from_the_compile_cache():
    """conftest's cache policy. An XLA:CPU executable read back from the persistent cache runs its
    collectives out of order (the 2x2x2 update step hung in 7 runs of 8), so programs over several
    devices compile afresh; single-device ones are still read from the cache."""
    mesh = make_mesh("2,2,2")
    x = jax.device_put(np.arange(64.0, dtype=np.float32).reshape(8, 8),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp")))
    hits = []  # from here on, only the compiles below
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
    for _ in range(2):  # a new function object each time: no in-memory hit, the cache is asked
        jax.jit(lambda x: jnp.sum(jnp.sin(x) * 1.25)).lower(x).compile()
    assert not hits
    for _ in range(2):
        jax.jit(lambda x: jnp.sum(jnp.sin(x) * 1.25)).lower(
            np.arange(64, dtype=np.float32)).compile()
    assert hits  # the second compile (at least) is read from the cache


def test_the_main_job_warns_of_a_cached_multi_device_cpu_mesh(caplog):
    from loopjax.sharding import warn_cached_cpu_collectives  # noqa: PLC0415
    assert jax.config.jax_compilation_cache_dir  # conftest's cache is on here
    assert warn_cached_cpu_collectives(make_mesh("2,2,2")) and "hang" in caplog.text
    assert not warn_cached_cpu_collectives(make_mesh("1,1,1", devices=jax.devices()[:1]))


def test_kl_and_its_stop_add_up_every_microbatch():
    """A step's kl_k1 = -(1/N) sum_b log w_b and kl_k3 = sum_t (r_t - 1 - log r_t) / (tokens) over
    the rollouts of ALL its microbatches, as computed here rollout by rollout (one unpadded forward
    pass each); and the KL stop reads that sum: an iteration whose KL is above the stop (about 31
    against 20) while each microbatch's share of it stays far below (at most 2 x 41.5 / 8 = 10.4)
    stops after its first step of two."""
    state, step = make(lora_update(minibatch_size=8, microbatch_size=2), one_device_mesh())
    assert step.config.num_microbatches == 4
    rng = np.random.default_rng(3)
    is_output = np.arange(16) >= 6  # 10 generated tokens per rollout
    # The policy is near uniform (log-prob about -4.16 per token); old log-probs of -0.01 to -2.0
    # give log w from about -41.5 to -21.6, different for every rollout (no microbatch's mean is
    # the whole step's).
    rollouts = [as_rollout(tokens=rng.integers(0, CFG.vocab_size, 16), is_output=is_output,
                           logp=np.where(is_output, -0.01 - 0.28 * i, 0.0),
                           turn_id=np.ones(16, int)) for i in range(8)]
    params, lora = jax.device_get(split_params(state.trainable, state.base))
    log_ratio = [np.asarray(token_logprobs(CFG, params, jnp.asarray(r.tokens)[None], lora=lora)[0]
                            - r.logp)[r.is_output] for r in rollouts]
    kl_k1 = -np.mean([np.sum(x) for x in log_ratio])
    kl_k3 = np.sum([np.sum(np.exp(x) - 1 - x) for x in log_ratio]) / sum(map(len, log_ratio))
    assert 25 < kl_k1 < 40
    _, history = run_iteration(step, state, rollouts, np.ones(8, np.float32), jax.random.key(0),
                               EpochConfig(buckets=(16,)))
    np.testing.assert_allclose(history[0]["kl_k1"], kl_k1, rtol=1e-4)
    np.testing.assert_allclose(history[0]["kl_k3"], kl_k3, rtol=1e-4)
    assert len(history) == 1 and history[0]["stopped_on_kl"]

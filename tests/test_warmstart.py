"""LOOP's optimizer started from the warm start's second moments: the carried state and the first
AdamW step it takes, against the closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from loopjax import warmstart
from loopjax.loop.update import UpdateConfig, make_optimizer


def _sft_state(params, grads_list):
    """The warm start's optimizer after a few steps."""
    sft = warmstart.sft_optimizer(1e-3, 10)
    state = sft.init(params)
    for g in grads_list:
        _, state = sft.update(g, state, params)
    return state


def test_with_second_moments_carries_nu_and_count_not_mu():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32),
                          params)
             for _ in range(3)]
    sft_state = _sft_state(params, grads)
    (sft_adam,) = [x for x in jax.tree.leaves(sft_state, is_leaf=warmstart._is_adam)
                   if warmstart._is_adam(x)]
    loop_state = warmstart.with_second_moments(make_optimizer(UpdateConfig()).init(params),
                                               sft_state)
    (adam,) = [x for x in jax.tree.leaves(loop_state, is_leaf=warmstart._is_adam)
               if warmstart._is_adam(x)]
    assert int(adam.count) == 3
    for k in params:
        np.testing.assert_array_equal(adam.nu[k], sft_adam.nu[k])
        np.testing.assert_array_equal(adam.mu[k], 0.0)
    # The tree structure is LOOP's own (it must stay a valid state for the jitted update step).
    assert (jax.tree.structure(loop_state)
            == jax.tree.structure(make_optimizer(UpdateConfig()).init(params)))


def test_first_loop_step_matches_adamw_closed_form():
    """One step from the carried state = AdamW's formula with the SFT's nu and count."""
    params = {"w": jnp.asarray([[0.5, -0.2, 0.1]], jnp.float32)}
    sft_grads = [{"w": jnp.asarray([[0.3, -0.1, 0.05]], jnp.float32)},
                 {"w": jnp.asarray([[0.2, 0.1, -0.05]], jnp.float32)}]
    c = UpdateConfig(learning_rate=1e-3, weight_decay=0.01, max_grad_norm=10.0)
    opt = make_optimizer(c)
    state = warmstart.with_second_moments(opt.init(params), _sft_state(params, sft_grads))
    g = np.array([[0.01, -0.02, 0.0]], np.float32)
    updates, _ = opt.update({"w": jnp.asarray(g)}, state, params)

    b1, b2, eps = 0.9, 0.999, 1e-8
    nu0 = 0.0
    for sg in sft_grads:  # small gradients: the SFT's norm clip (1.0) leaves them unchanged
        nu0 = b2 * nu0 + (1 - b2) * np.asarray(sg["w"]) ** 2
    t = len(sft_grads) + 1
    mu = (1 - b1) * g
    nu = b2 * nu0 + (1 - b2) * g ** 2
    want = -c.learning_rate * ((mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
                               + c.weight_decay * np.asarray(params["w"]))
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5, atol=1e-9)
    # A fresh AdamW would instead move each coordinate with a gradient by ~lr (sign-like).
    fresh, _ = opt.update({"w": jnp.asarray(g)}, opt.init(params), params)
    assert abs(float(fresh["w"][0, 0])) > 5 * abs(float(updates["w"][0, 0]))


@pytest.mark.parametrize("carry", [False, True])
def test_trainer_warm_start_hands_loop_a_placed_optimizer_state(tmp_path, carry):
    """train.warm_start: with sft_moments_to_loop the LOOP optimizer continues the SFT's count
    and second moments, without it it starts fresh; either way the state sits on its shardings."""
    from experiments.appworld_loop import resolve  # noqa: PLC0415
    from loopjax import train  # noqa: PLC0415

    steps = 3
    config = resolve([f"--run_dir={tmp_path}", "--scratch.hidden_size=32", "--scratch.num_layers=1",
                      "--scratch.intermediate_size=64", "--scratch.head_dim=16",
                      "--scratch.vocab_size=400", "--tasks_per_iteration=1",
                      "--rollouts_per_task=2", f"--sft_steps={steps}", "--sft_rows=8",
                      f"--sft_moments_to_loop={carry}"])
    trainer = train.setup(config)
    try:
        train.warm_start(trainer)
    finally:
        for env in trainer.envs:
            env.close()
    (adam,) = [x for x in jax.tree.leaves(trainer.state.opt_state, is_leaf=warmstart._is_adam)
               if warmstart._is_adam(x)]
    assert int(adam.count) == (steps if carry else 0)
    nu_sum = sum(float(jnp.sum(v)) for v in jax.tree.leaves(adam.nu))
    assert (nu_sum > 0) == carry
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(adam.mu))
    want = jax.tree.leaves(trainer.update_step.state_shardings.opt_state)
    got = [x.sharding for x in jax.tree.leaves(trainer.state.opt_state)]
    assert len(got) == len(want) and all(g == w for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("mesh_shape", ["1,1,1", "2,2,2"])
def test_sft_step_is_the_reference_gradient(monkeypatch, mesh_shape):
    """One warm-start step with plain SGD at lr 1 (so params move by exactly the gradient) equals
    jax.grad of the mean NLL of every demonstration's output tokens, on one device and on the
    2x2x2 mesh (full weights, demonstrations packed several to a row)."""
    from loopjax.models.transformer import init_params, token_logprobs  # noqa: PLC0415
    from loopjax.sharding import make_mesh, microbatch_sharding, param_shardings  # noqa: PLC0415
    from update_fixtures import CFG, random_rollouts  # noqa: PLC0415

    monkeypatch.setattr(warmstart, "sft_optimizer", lambda learning_rate, steps: optax.sgd(1.0))
    records = random_rollouts(4, 6)
    params = jax.device_get(init_params(CFG, jax.random.key(0)))
    params["unembed"] = params["unembed"] * 10.0

    def nll(p):
        total = sum(jnp.sum(token_logprobs(CFG, p, jnp.asarray(r.tokens)[None])[0][r.is_output])
                    for r in records)
        return -total / sum(int(r.is_output.sum()) for r in records)
    want = jax.jit(jax.grad(nll))(params)

    mesh = make_mesh(mesh_shape, devices=jax.devices()[:8 if mesh_shape == "2,2,2" else 1])
    placed = jax.device_put(params, param_shardings(mesh, params))
    trained, _ = warmstart.sft(CFG, placed, None, records, steps=1, rows=8, length=16,
                               learning_rate=1.0, key=jax.random.key(1),
                               batch_sharding=microbatch_sharding(mesh))
    got = jax.tree.map(lambda b, a: b - np.asarray(a), params, jax.device_get(trained))
    norm = float(optax.tree.norm(want))
    # fp32 reduction order only: atol 1e-5 of the gradient norm.
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5 * norm, rtol=1e-4),
                 got, want)

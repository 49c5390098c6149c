"""TrainState and the jitted, sharded, donated LOOP update step.

    state = init_train_state(model_config, update_config, base_params, key, mesh)
    update_step = make_update_step(model_config, update_config, mesh, state, temperature=1.0)
    state, metrics = update_step(state, batch)          # jitted once per batch shape

The batch (loopjax.rollout.Batch) comes microbatch-major from the one packer: the step scans
over its microbatches, summing their gradients (each divides by the fixed M), and takes one
optimizer step.

The frozen base weights live in `state.base` but never enter the jitted step's donated argument
nor the optimizer: the step takes them as a separate, non-donated input and hands the same
arrays back, so exactly one copy of the LLM exists. With `train_full_weights` the params are the
trainable tree themselves and `state.base` is None. The loss, the |A| filter and the guards are
loopjax.loop.objective's; this file wires them to the model, the optimizer and the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loopjax.config import UpdateConfig
from loopjax.loop.objective import SUM_KEYS, keep_mask, loss_metrics, policy_loss, step_guard
from loopjax.models.config import ModelConfig
from loopjax.models.lora import init_lora
from loopjax.models.transformer import token_logprobs
from loopjax.rollout.batch import Batch
from loopjax.sharding import data_parallel_size, microbatch_sharding, param_shardings

# With skip_outlier_grads: a step whose grad norm is more than OUTLIER_SIGMA standard deviations
# above the mean of the accepted ones is skipped, once OUTLIER_WARMUP steps were accepted
OUTLIER_SIGMA = 5.0
OUTLIER_WARMUP = 10


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped steps do not count)
    trainable: Any  # LoRA adapter, or the full params with train_full_weights
    opt_state: Any  # optax state of `trainable` only
    base: Any  # frozen base params (None with train_full_weights)
    nan_skips: jax.Array  # int32: steps skipped for a non-finite loss or gradient
    outlier_skips: jax.Array  # int32: steps skipped as grad-norm outliers
    # Welford running statistics of accepted grad norms (scalars: the sharding table
    # replicates them)
    gnorm_count: jax.Array
    gnorm_mean: jax.Array
    gnorm_m2: jax.Array

    @property
    def params(self):
        """The model params the forward pass uses."""
        return split_params(self.trainable, self.base)[0]


def split_params(trainable, base):
    """(params, lora) for the forward pass: the frozen base and the adapter, or, with
    train_full_weights (base None), the trained params themselves and no adapter."""
    return (trainable, None) if base is None else (base, trainable)


def make_optimizer(config: UpdateConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(config.learning_rate, weight_decay=config.weight_decay))


def _state_shardings(mesh, state: TrainState):
    """Shardings of a TrainState from the one rules table (its scalars come out replicated)."""
    return param_shardings(mesh, state)


def init_train_state(model_config: ModelConfig, config: UpdateConfig, params, key,
                     mesh) -> TrainState:
    """A sharded TrainState around `params` (which it takes over, uncopied when already sharded)."""
    params = jax.device_put(params, param_shardings(mesh, params))
    if config.train_full_weights:
        trainable, base = params, None
    else:
        trainable, base = init_lora(model_config, config.lora, key), params
    optimizer = make_optimizer(config)

    def build(trainable):
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                          opt_state=optimizer.init(trainable), base=None,
                          nan_skips=jnp.zeros((), jnp.int32),
                          outlier_skips=jnp.zeros((), jnp.int32),
                          gnorm_count=jnp.zeros((), jnp.float32),
                          gnorm_mean=jnp.zeros((), jnp.float32),
                          gnorm_m2=jnp.zeros((), jnp.float32))

    # Initialize sharded: shapes first, then a jitted init that writes straight into the shards.
    shardings = _state_shardings(mesh, jax.eval_shape(build, trainable))
    state = jax.jit(build, out_shardings=shardings)(
        jax.device_put(trainable, param_shardings(mesh, trainable)))
    return state.replace(base=base)


def rollout_logprobs(model_config, trainable, base, mb: Batch, temperature: float = 1.0):
    """logp_new_BxT: the learner's log-prob of each token of one microbatch's rollout slots, read
    out of its packed forward rows (`mb` is a Batch without its leading microbatch axis); the
    gather's gradient scatters back into the rows."""
    params, lora = split_params(trainable, base)
    R, T = mb.tokens_UxRxT.shape
    # Row positions of generated tokens: only their log-probs are computed (token_logprobs).
    needed_RxT = jnp.zeros(R * T, bool).at[jnp.where(mb.mask_UxBxT, mb.src_UxBxT, R * T)].set(
        True, mode="drop").reshape(R, T)
    logp_RxT = token_logprobs(model_config, params, mb.tokens_UxRxT,
                              positions_BxT=mb.positions_UxRxT,
                              segment_ids_BxT=mb.segment_ids_UxRxT,
                              prefix_ids_BxT=mb.prefix_ids_UxRxT, lora=lora,
                              temperature=temperature, needed_BxT=needed_RxT)
    return jnp.take(logp_RxT.reshape(-1), mb.src_UxBxT, mode="clip")


def _loss_fn(model_config, config, temperature, base, trainable, mb: Batch):
    """(loss, the sums of SUM_KEYS) of one microbatch (a Batch without its leading axis);
    filtered rollouts get weight 0."""
    logp_new_BxT = rollout_logprobs(model_config, trainable, base, mb, temperature)
    weight_B = mb.weight_UxB * keep_mask(mb.adv_UxB, config.adv_min_abs, config.adv_positive_only)
    mask_BxT = mb.mask_UxBxT & (weight_B[:, None] > 0)
    loss, aux = policy_loss(logp_new_BxT, mb.logp_old_UxBxT, mb.adv_UxB, mask_BxT,
                            level=config.level, clip_eps=config.clip_eps,
                            clip_form=config.clip_form, turn_ids_BxT=mb.turn_ids_UxBxT,
                            loss_denominator=config.minibatch_size)
    return loss, {k: aux[k] for k in SUM_KEYS}


def _step(model_config, config, temperature, optimizer, state: TrainState, base, batch: Batch):
    """One optimizer step on a minibatch: loss and metrics from loopjax.loop.objective."""
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model_config, config, temperature,
                                                   base), has_aux=True)

    # --- the gradient of the minibatch, summed over its microbatches (each divides by M)
    def accumulate(carry, mb):
        (loss, sums), grads = grad_fn(state.trainable, mb)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(jnp.add, carry, (grads, loss, sums)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32),
                         (state.trainable, 0.0, dict.fromkeys(SUM_KEYS, 0.0)))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, zeros, batch)

    # --- guards: a non-finite loss/gradient or (optionally) an outlier gradient norm skips the step
    grad_norm = optax.tree.norm(grads)
    (apply, finite, outlier), (count, mean, m2) = step_guard(
        loss, grad_norm, state.gnorm_count, state.gnorm_mean, state.gnorm_m2,
        skip_outliers=config.skip_outlier_grads, sigma=OUTLIER_SIGMA, warmup=OUTLIER_WARMUP)

    # --- one AdamW step (global-norm clipped), or none
    def do_apply(args):
        trainable, opt_state = args
        grads_cast = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
        updates, opt_state = optimizer.update(grads_cast, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    trainable, opt_state = jax.lax.cond(apply, do_apply, lambda args: args,
                                        (state.trainable, state.opt_state))
    state = state.replace(
        step=state.step + apply.astype(jnp.int32), trainable=trainable, opt_state=opt_state,
        nan_skips=state.nan_skips + (~finite).astype(jnp.int32),
        outlier_skips=state.outlier_skips + (finite & outlier).astype(jnp.int32),
        gnorm_count=count, gnorm_mean=mean, gnorm_m2=m2)
    metrics = dict(loss=loss, grad_norm=grad_norm, applied=apply, nan_skipped=~finite,
                   outlier_skipped=finite & outlier, **loss_metrics(sums),
                   num_rollouts=sums["num_rollouts"], num_tokens=sums["num_tokens"],
                   step=state.step, nan_skips=state.nan_skips, outlier_skips=state.outlier_skips)
    return state, metrics


class UpdateStep:
    """`update_step(state, batch) -> (state, metrics)`; one jit, one compile per batch shape.

    The jitted function takes (state without base, base, batch) with explicit shardings; only the
    first is donated, so the frozen base weights are never copied and never invalidated.
    """

    def __init__(self, model_config: ModelConfig, config: UpdateConfig, mesh, state: TrainState,
                 temperature: float = 1.0):
        if config.remat:
            model_config = model_config.replace(remat=True)
        if config.minibatch_size % data_parallel_size(mesh):
            raise ValueError(f"minibatch_size {config.minibatch_size} must divide by the "
                             f"data-parallel size {data_parallel_size(mesh)} of mesh "
                             f"{dict(mesh.shape)}")
        self.config = config
        self.mesh = mesh
        optimizer = make_optimizer(config)
        trained = state.replace(base=None)
        state_sh = _state_shardings(mesh, jax.eval_shape(lambda s: s, trained))
        base_sh = None if state.base is None else param_shardings(mesh, state.base)
        # Forward rows split over the data-parallel devices inside every microbatch (packing
        # rounds their count to dp); rollout slots too where their count divides.
        dp = data_parallel_size(mesh)
        rows_sh = microbatch_sharding(mesh)
        slots_sh = rows_sh if (config.minibatch_size // config.num_microbatches) % dp == 0 \
            else NamedSharding(mesh, P())
        batch_sh = Batch(rows_sh, rows_sh, rows_sh, rows_sh, *([slots_sh] * 6))
        self.batch_sharding = batch_sh
        self.state_shardings = state_sh

        def step(trained, base, batch):
            return _step(model_config, config, temperature, optimizer, trained, base, batch)

        self.jitted = jax.jit(step, in_shardings=(state_sh, base_sh, batch_sh),
                              out_shardings=(state_sh, NamedSharding(mesh, P())),
                              donate_argnums=(0,))

    def __call__(self, state: TrainState, batch: Batch):
        U, B = batch.adv_UxB.shape
        if (U, U * B) != (self.config.num_microbatches, self.config.minibatch_size):
            raise ValueError(f"batch has {U} x {B} rollout slots but the update takes "
                             f"{self.config.num_microbatches} microbatches of "
                             f"{self.config.minibatch_size} rollouts; pack with pack_minibatch("
                             f"..., microbatches={self.config.num_microbatches})")
        rows = batch.tokens_UxRxT.shape[1]
        if rows % data_parallel_size(self.mesh):
            raise ValueError(f"{rows} forward rows per microbatch must divide by the "
                             f"data-parallel size {data_parallel_size(self.mesh)}")
        base = state.base
        # No-ops when already placed; fixes up host batches and a re-initialized optimizer state.
        # The base is not moved here: a mismatch there raises rather than silently copying the LLM.
        trained = jax.device_put(state.replace(base=None), self.state_shardings)
        batch = jax.device_put(batch, self.batch_sharding)
        new_state, metrics = self.jitted(trained, base, batch)
        return new_state.replace(base=base), metrics

    def num_compiles(self) -> int:
        return self.jitted._cache_size()


def make_update_step(model_config: ModelConfig, config: UpdateConfig, mesh, state: TrainState, *,
                     temperature: float = 1.0) -> UpdateStep:
    """The update step; `temperature` is the one the behaviour log-probs were sampled at."""
    return UpdateStep(model_config, config, mesh, state, temperature)

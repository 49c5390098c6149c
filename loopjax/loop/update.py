"""TrainState, the batch the learner consumes, and the jitted, sharded, donated LOOP update step.

    state = init_train_state(model_config, update_config, base_params, key, mesh)
    update_step = make_update_step(model_config, update_config, mesh, state)
    state, metrics = update_step(state, batch)          # jitted once per batch shape

The frozen base weights live in `state.base` but never enter the jitted step's donated argument
nor the optimizer: the step takes them as a separate, non-donated input and hands the same
arrays back, so exactly one copy of the LLM exists. With `train_full_weights` the params are the
trainable tree themselves and `state.base` is None. The loss, the |A| filter and the guards are
loopjax.loop.objective's; this file wires them to the model, the optimizer and the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from loopjax.loop.objective import (BASELINES, LEVELS, SUM_KEYS, clip_range, keep_mask,
                                    loss_metrics, policy_loss, step_guard)
from loopjax.models.config import ModelConfig
from loopjax.models.lora import LoraConfig, init_lora
from loopjax.models.transformer import token_logprobs
from loopjax.sharding import batch_sharding, data_parallel_size, param_shardings


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    level: str = "token"  # importance-weight level: token | turn | trajectory
    clip_form: str | None = "reference"  # reference [1/(1+eps), 1+eps] | paper [1-eps, 1+eps] | None
    clip_eps: float = 0.1  # clip width
    minibatch_size: int = 32  # rollouts per optimizer step = the fixed loss denominator M
    microbatch_size: int = 0  # rows per forward/backward inside the step (0 = the whole minibatch)
    learning_rate: float = 5e-5  # constant AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 0.1  # global-norm clip (reference code 0.1; the paper says 1.0)
    baseline: str = "leave_one_out"  # leave_one_out | leave_none_out | rft (own successes, A = 1)
    normalize_std: bool = False  # divide advantages by the task's reward std (GRPO / RwNorm)
    adv_min_abs: float = 0.01  # rollouts with |A| below this are dropped (weight 0)
    adv_positive_only: bool = False  # also drop rollouts with A <= 0
    temperature: float = 1.0  # sampling temperature the behaviour log-probs were taken at
    remat: bool | None = None  # override ModelConfig.remat (per-layer rematerialization); None = keep
    train_full_weights: bool = False  # train every weight instead of a LoRA adapter
    lora: LoraConfig = LoraConfig()  # adapter shape when not train_full_weights
    skip_outlier_grads: bool = False  # skip steps whose grad norm is > outlier_sigma above the mean
    outlier_sigma: float = 5.0  # how many standard deviations make an outlier
    outlier_warmup: int = 10  # accepted steps before the outlier test starts

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r} must be one of {LEVELS}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline {self.baseline!r} must be one of {BASELINES}")
        clip_range(self.clip_eps, self.clip_form)  # validates clip_form and clip_eps
        mb = self.microbatch_size or self.minibatch_size
        if self.minibatch_size <= 0 or mb <= 0 or self.minibatch_size % mb:
            raise ValueError(f"minibatch_size {self.minibatch_size} must be a positive multiple of "
                             f"microbatch_size {self.microbatch_size}")

    @property
    def num_microbatches(self) -> int:
        return self.minibatch_size // (self.microbatch_size or self.minibatch_size)


@flax.struct.dataclass
class Batch:
    """One minibatch: B = minibatch_size rollout slots, as the loss sees them (one rollout per row,
    right-padded), and the R forward rows that hold their tokens. Unpacked, R = B and rollout b is
    forward row b; packed (loopjax.loop.epochs), several rollouts share a forward row as segments,
    so R < B rows of T tokens do the forward and backward pass.

    Forward rows [R, T]:
    tokens_RxT      int32  token ids; 0 on padding
    positions_RxT   int32  RoPE positions, restarting at 0 for each rollout of a row
    segment_ids_RxT int32  1, 2, ... for the rollouts of a row (attention stays inside one); 0 on padding
    Rollout slots [B, T] / [B]:
    src_BxT         int32  where rollout b's t-th token lies: forward row * T + column (0 past
                           its end); the row must be in b's microbatch (row = b mod microbatches)
    mask_BxT        bool   is_output: True exactly on generated tokens (these carry the loss)
    logp_old_BxT    f32    behaviour log-probs on generated tokens (anything elsewhere)
    adv_B           f32    the rollout's advantage
    turn_ids_BxT    int32  turn index of each token, in [0, T) (used at level="turn")
    weight_B        f32    1 for a real rollout, 0 for an empty slot (denominator stays M)
    """
    tokens_RxT: jax.Array
    positions_RxT: jax.Array
    segment_ids_RxT: jax.Array
    src_BxT: jax.Array
    mask_BxT: jax.Array
    logp_old_BxT: jax.Array
    adv_B: jax.Array
    turn_ids_BxT: jax.Array
    weight_B: jax.Array


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped steps do not count)
    trainable: Any  # LoRA adapter, or the full params with train_full_weights
    opt_state: Any  # optax state of `trainable` only
    base: Any  # frozen base params (None with train_full_weights)
    nan_skips: jax.Array  # int32: steps skipped for a non-finite loss or gradient
    outlier_skips: jax.Array  # int32: steps skipped as grad-norm outliers
    # Welford running statistics of accepted grad norms (scalars: the sharding table replicates them)
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


def init_train_state(model_config: ModelConfig, config: UpdateConfig, params, key, mesh) -> TrainState:
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
                          nan_skips=jnp.zeros((), jnp.int32), outlier_skips=jnp.zeros((), jnp.int32),
                          gnorm_count=jnp.zeros((), jnp.float32), gnorm_mean=jnp.zeros((), jnp.float32),
                          gnorm_m2=jnp.zeros((), jnp.float32))

    # Initialize sharded: shapes first, then a jitted init that writes straight into the shards.
    shardings = _state_shardings(mesh, jax.eval_shape(build, trainable))
    state = jax.jit(build, out_shardings=shardings)(
        jax.device_put(trainable, param_shardings(mesh, trainable)))
    return state.replace(base=base)


def _microbatches(batch: Batch, num: int, mesh) -> Batch:
    """[B, ...] -> [num, B/num, ...] (and [R, ...] -> [num, R/num, ...]): microbatch i = rows i,
    i+num, ... so each stays device-local."""
    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        if x.shape[1] % data_parallel_size(mesh) == 0:
            spec = P(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x
    return jax.tree.map(split, batch)


def rollout_logprobs(model_config, config, trainable, base, mb: Batch):
    """logp_new_BxT: the learner's log-prob of each token of the microbatch's rollouts (one per
    row), read out of its packed forward rows; `mb` is one microbatch as `_microbatches` cuts it."""
    params, lora = split_params(trainable, base)
    logp_RxT = token_logprobs(model_config, params, mb.tokens_RxT, positions_BxT=mb.positions_RxT,
                              segment_ids_BxT=mb.segment_ids_RxT, lora=lora,
                              temperature=config.temperature)
    # Forward rows -> one rollout per row; the gather's gradient scatters back. A microbatch holds
    # every num-th forward row (_microbatches): global row r is its row r // num.
    T = logp_RxT.shape[1]
    src_BxT = (mb.src_BxT // T // config.num_microbatches) * T + mb.src_BxT % T
    return jnp.take(logp_RxT.reshape(-1), src_BxT, mode="clip")


def _loss_fn(model_config, config, base, trainable, mb: Batch):
    """(loss, the sums of SUM_KEYS) of one microbatch; filtered rollouts get weight 0."""
    logp_new_BxT = rollout_logprobs(model_config, config, trainable, base, mb)
    weight_B = mb.weight_B * keep_mask(mb.adv_B, config.adv_min_abs, config.adv_positive_only)
    mask_BxT = mb.mask_BxT & (weight_B[:, None] > 0)
    loss, aux = policy_loss(logp_new_BxT, mb.logp_old_BxT, mb.adv_B, mask_BxT, level=config.level,
                            clip_eps=config.clip_eps, clip_form=config.clip_form,
                            turn_ids_BxT=mb.turn_ids_BxT, loss_denominator=config.minibatch_size)
    return loss, {k: aux[k] for k in SUM_KEYS}


def _step(model_config, config, optimizer, mesh, state: TrainState, base, batch: Batch):
    """One optimizer step on a minibatch: loss and metrics from loopjax.loop.objective."""
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model_config, config, base),
                                 has_aux=True)

    # --- the gradient of the minibatch, summed over its microbatches (each divides by M)
    def accumulate(carry, mb):
        (loss, sums), grads = grad_fn(state.trainable, mb)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(jnp.add, carry, (grads, loss, sums)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32),
                         (state.trainable, 0.0, dict.fromkeys(SUM_KEYS, 0.0)))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, zeros,
                                          _microbatches(batch, config.num_microbatches, mesh))

    # --- guards: a non-finite loss/gradient or (optionally) an outlier gradient norm skips the step
    grad_norm = optax.tree.norm(grads)
    (apply, finite, outlier), (count, mean, m2) = step_guard(
        loss, grad_norm, state.gnorm_count, state.gnorm_mean, state.gnorm_m2,
        skip_outliers=config.skip_outlier_grads, sigma=config.outlier_sigma,
        warmup=config.outlier_warmup)

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

    def __init__(self, model_config: ModelConfig, config: UpdateConfig, mesh, state: TrainState):
        if config.remat is not None:
            model_config = model_config.replace(remat=config.remat)
        if config.minibatch_size % data_parallel_size(mesh):
            raise ValueError(f"minibatch_size {config.minibatch_size} must divide by the "
                             f"data-parallel size {data_parallel_size(mesh)} of mesh {dict(mesh.shape)}")
        self.config = config
        self.mesh = mesh
        optimizer = make_optimizer(config)
        trained = state.replace(base=None)
        state_sh = _state_shardings(mesh, jax.eval_shape(lambda s: s, trained))
        base_sh = None if state.base is None else param_shardings(mesh, state.base)
        row_sh = batch_sharding(mesh)
        batch_sh = Batch(*([row_sh] * len(dataclasses.fields(Batch))))
        self.batch_sharding = batch_sh
        self.state_shardings = state_sh

        def step(trained, base, batch):
            return _step(model_config, config, optimizer, mesh, trained, base, batch)

        self.jitted = jax.jit(step, in_shardings=(state_sh, base_sh, batch_sh),
                              out_shardings=(state_sh, NamedSharding(mesh, P())),
                              donate_argnums=(0,))

    def __call__(self, state: TrainState, batch: Batch):
        if batch.adv_B.shape[0] != self.config.minibatch_size:
            raise ValueError(f"batch has {batch.adv_B.shape[0]} rows but minibatch_size is "
                             f"{self.config.minibatch_size}; pad with weight_B = 0 rows")
        rows, num = batch.tokens_RxT.shape[0], self.config.num_microbatches
        if rows % num or rows % data_parallel_size(self.mesh):
            raise ValueError(f"{rows} forward rows must divide by the {num} microbatches and the "
                             f"data-parallel size {data_parallel_size(self.mesh)}")
        if isinstance(batch.src_BxT, np.ndarray) and num > 1:  # a host batch: check its layout
            row_B = batch.src_BxT[:, 0] // batch.tokens_RxT.shape[1]
            if np.any((row_B % num != np.arange(len(row_B)) % num) & (batch.weight_B > 0)):
                raise ValueError(f"a rollout lies in a forward row of another microbatch: pack "
                                 f"with groups={num} (loopjax.loop.epochs.pack_minibatch)")
        base = state.base
        # No-ops when already placed; fixes up host batches and a re-initialized optimizer state.
        # The base is not moved here: a mismatch there raises rather than silently copying the LLM.
        trained = jax.device_put(state.replace(base=None), self.state_shardings)
        batch = jax.device_put(batch, self.batch_sharding)
        new_state, metrics = self.jitted(trained, base, batch)
        return new_state.replace(base=base), metrics

    def num_compiles(self) -> int:
        return self.jitted._cache_size()


def make_update_step(model_config: ModelConfig, config: UpdateConfig, mesh, state: TrainState):
    return UpdateStep(model_config, config, mesh, state)

"""The epoch driver of one LOOP iteration: filter, shuffle, bucket, pack, step, stop on KL.

Rollouts are taken one per row, right-padded to the smallest bucket length that holds the longest
rollout of the minibatch, so a run compiles the update step at most once per bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from loopjax import multihost
from loopjax.loop.update import Batch, TrainState, UpdateStep

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class EpochConfig:
    epochs_per_iteration: int = 2  # passes over the iteration's rollouts
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # allowed padded lengths T, ascending
    kl_stop: float = 20.0  # stop the iteration's remaining steps once |kl_k1| exceeds this
    max_nan_skips: int = 20  # more skipped (non-finite) steps than this aborts training

    def __post_init__(self):
        if self.epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be >= 1, got {self.epochs_per_iteration}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets {self.buckets} must be a non-empty ascending tuple")


def _get(rollout, name):
    return rollout[name] if isinstance(rollout, dict) else getattr(rollout, name)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a rollout of {length} tokens is longer than the largest bucket {buckets[-1]}; "
                     "add a larger bucket to EpochConfig.buckets")


def pack_minibatch(rollouts: Sequence[Any], adv_N, rows: int, length: int) -> Batch:
    """NumPy Batch of `rows` rows x `length` tokens; rows past len(rollouts) are weight-0 padding.

    Each rollout provides tokens, is_output, logp (behaviour log-prob per token) and turn_id.
    """
    if len(rollouts) > rows:
        raise ValueError(f"{len(rollouts)} rollouts do not fit a minibatch of {rows} rows")
    tokens = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    logp = np.zeros((rows, length), np.float32)
    turns = np.zeros((rows, length), np.int32)
    adv = np.zeros((rows,), np.float32)
    weight = np.zeros((rows,), np.float32)
    for i, r in enumerate(rollouts):
        t = np.asarray(_get(r, "tokens"))
        n = len(t)
        if n > length:
            raise ValueError(f"rollout {i} has {n} tokens, more than the row length {length}")
        turn = np.asarray(_get(r, "turn_id"), np.int32)
        if n and (turn.min() < 0 or turn.max() >= length):
            raise ValueError(f"rollout {i}: turn ids must lie in [0, {length}), got "
                             f"[{turn.min()}, {turn.max()}]")
        tokens[i, :n] = t
        positions[i, :n] = np.arange(n)
        segments[i, :n] = 1
        mask[i, :n] = np.asarray(_get(r, "is_output"), bool)
        logp[i, :n] = np.asarray(_get(r, "logp"), np.float32)
        turns[i, :n] = turn
        adv[i] = adv_N[i]
        weight[i] = 1.0
    return Batch(tokens, positions, segments, mask, logp, adv, turns, weight)


def minibatch_plan(adv_N, lengths_N, key, *, minibatch_size: int, epochs: int, min_abs: float,
                   positive_only: bool) -> list[np.ndarray]:
    """Index arrays of each minibatch, over all epochs: signal-free rollouts dropped, reshuffled
    across tasks every epoch; the last minibatch of an epoch may be short (padded when packed)."""
    adv_N = np.asarray(adv_N)
    keep = np.abs(adv_N) >= min_abs
    if positive_only:
        keep &= adv_N > 0
    kept = np.flatnonzero(keep)
    plan = []
    for key_e in jax.random.split(key, epochs):
        order = kept[np.asarray(jax.random.permutation(key_e, len(kept)))] if len(kept) else kept
        plan += [order[i:i + minibatch_size] for i in range(0, len(order), minibatch_size)]
    return plan


def run_iteration(update_step: UpdateStep, state: TrainState, rollouts: Sequence[Any], adv_N, key,
                  config: EpochConfig = EpochConfig(), progress=None):
    """`epochs_per_iteration` epochs of minibatch updates over one iteration's rollouts.

    Returns (state, metrics): one dict of host floats per step taken, each with its bucket length
    `T`; the last dict has `stopped_on_kl` True when |kl_k1| > kl_stop ended the iteration early.
    `progress(total)`, if given, makes a progress bar (with `update()` and `close()`) for the steps.
    """
    uc = update_step.config
    M = uc.minibatch_size
    adv_N = np.asarray(adv_N, np.float32)
    if len(adv_N) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(adv_N)} advantages")
    lengths_N = np.array([len(_get(r, "tokens")) for r in rollouts])
    plan = minibatch_plan(adv_N, lengths_N, key, minibatch_size=M,
                          epochs=config.epochs_per_iteration, min_abs=uc.adv_min_abs,
                          positive_only=uc.adv_positive_only)

    # Every process knows all rollouts and the same plan; it packs only the rows its own devices
    # hold (all M rows on one host), and the global batch is assembled from the processes' blocks.
    rows = multihost.host_rows(update_step.batch_sharding.adv_B, M)

    def to_device(idx):
        T = bucket_length(int(lengths_N[idx].max()), config.buckets)
        mine = idx[rows]
        batch = pack_minibatch([rollouts[i] for i in mine], adv_N[mine], rows.stop - rows.start, T)
        return multihost.global_batch(batch, update_step.batch_sharding, M), T

    history = []
    bar = progress(len(plan)) if progress is not None else None
    nxt = to_device(plan[0]) if plan else None
    for i in range(len(plan)):
        batch, T = nxt
        state, metrics = update_step(state, batch)
        # Pack and ship the next minibatch while this step runs; only then wait for its metrics.
        if i + 1 < len(plan):
            nxt = to_device(plan[i + 1])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(T=T, stopped_on_kl=False)
        history.append(metrics)
        if bar is not None:
            bar.update(1)
        if metrics["nan_skips"] > config.max_nan_skips:
            raise RuntimeError(f"{int(metrics['nan_skips'])} update steps had a non-finite loss or "
                               f"gradient (limit {config.max_nan_skips}); training is diverging")
        if abs(metrics["kl_k1"]) > config.kl_stop:
            metrics["stopped_on_kl"] = True
            break
    if bar is not None:
        bar.close()
    return state, history

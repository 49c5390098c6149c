"""The epoch driver of one LOOP iteration: filter, shuffle, bucket, pack, step, stop on KL.

A minibatch's rows are as long as the smallest bucket length that holds its longest rollout.
Rollouts are packed several to a forward row (`pack`, the default) into a few row counts per
bucket, so a run compiles the update step at most a few times per bucket; unpacked, each rollout
takes a row of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from loopjax import multihost
from loopjax.loop.objective import keep_mask, kl_stop
from loopjax.loop.update import Batch, TrainState, UpdateStep
from loopjax.sharding import data_parallel_size

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class EpochConfig:
    epochs_per_iteration: int = 2  # passes over the iteration's rollouts
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # allowed padded lengths T, ascending
    kl_stop: float = 20.0  # stop the iteration's remaining steps once |kl_k1| exceeds this
    max_nan_skips: int = 20  # more skipped (non-finite) steps than this aborts training
    pack: bool = True  # several rollouts per forward row (fewer padded tokens); False: one per row

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


def forward_rows(lengths: Sequence[int], length: int, *, pack: bool, groups: int = 1,
                 multiple: int = 1, slots: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """Where each rollout goes among the forward rows: (R, [(row, offset) per rollout]).

    Slot i belongs to microbatch group i % `groups`, and so does forward row r (r % groups), so
    every rollout lies in a row of its own microbatch. Unpacked, rollout i is row i (R = slots).
    Packed, each group's rollouts fill rows of `length` tokens first-fit, longest first; every group
    gets the same number of rows, rounded up to a quarter of the unpacked rows per group (and to
    `multiple`, the data-parallel size) so that a run compiles a few row counts per bucket.
    """
    slots = len(lengths) if slots is None else slots
    if not pack:
        return slots, [(i, 0) for i in range(len(lengths))]
    per_group = slots // groups
    quantum = -(-max(per_group // 4, 1) // multiple) * multiple
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    need = 1
    for g in range(groups):
        members = sorted(range(g, len(lengths), groups), key=lambda i: -lengths[i])
        fill: list[int] = []
        for i in members:
            j = next((j for j, f in enumerate(fill) if f + lengths[i] <= length), len(fill))
            if j == len(fill):
                fill.append(0)
            place[i] = (j, fill[j])
            fill[j] += lengths[i]
        need = max(need, len(fill))
    per_row = min(-(-need // quantum) * quantum, per_group)
    return per_row * groups, [(j * groups + i % groups, off) for i, (j, off) in enumerate(place)]


def pack_minibatch(rollouts: Sequence[Any], adv_N, rows: int, length: int, *, pack: bool = False,
                   groups: int = 1, multiple: int = 1) -> Batch:
    """NumPy Batch of `rows` rollout slots x `length` tokens; slots past len(rollouts) are
    weight-0 padding. `pack` puts several rollouts in one forward row (see `forward_rows`);
    `groups` is the number of microbatches the update step splits the batch into.

    Each rollout provides tokens, is_output, logp (behaviour log-prob per token) and turn_id.
    """
    if len(rollouts) > rows:
        raise ValueError(f"{len(rollouts)} rollouts do not fit a minibatch of {rows} rows")
    if rows % groups:
        raise ValueError(f"a minibatch of {rows} rows does not split into {groups} microbatches")
    toks = [np.asarray(_get(r, "tokens")) for r in rollouts]
    for i, t in enumerate(toks):
        if len(t) > length:
            raise ValueError(f"rollout {i} has {len(t)} tokens, more than the row length {length}")
    R, place = forward_rows([len(t) for t in toks], length, pack=pack, groups=groups,
                            multiple=multiple, slots=rows)
    tokens = np.zeros((R, length), np.int32)
    positions = np.zeros((R, length), np.int32)
    segments = np.zeros((R, length), np.int32)
    src = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    logp = np.zeros((rows, length), np.float32)
    turns = np.zeros((rows, length), np.int32)
    adv = np.zeros((rows,), np.float32)
    weight = np.zeros((rows,), np.float32)
    for i, (r, t) in enumerate(zip(rollouts, toks)):
        n = len(t)
        turn = np.asarray(_get(r, "turn_id"), np.int32)
        if n and (turn.min() < 0 or turn.max() >= length):
            raise ValueError(f"rollout {i}: turn ids must lie in [0, {length}), got "
                             f"[{turn.min()}, {turn.max()}]")
        row, off = place[i]
        tokens[row, off:off + n] = t
        positions[row, off:off + n] = np.arange(n)
        segments[row, off:off + n] = segments[row].max() + 1
        src[i, :n] = row * length + off + np.arange(n)
        mask[i, :n] = np.asarray(_get(r, "is_output"), bool)
        logp[i, :n] = np.asarray(_get(r, "logp"), np.float32)
        turns[i, :n] = turn
        adv[i] = adv_N[i]
        weight[i] = 1.0
    return Batch(tokens, positions, segments, src, mask, logp, adv, turns, weight)


def minibatch_plan(adv_N, lengths_N, key, *, minibatch_size: int, epochs: int, min_abs: float,
                   positive_only: bool) -> list[np.ndarray]:
    """Index arrays of each minibatch, over all epochs: signal-free rollouts dropped, reshuffled
    across tasks every epoch; the last minibatch of an epoch may be short (padded when packed)."""
    kept = np.flatnonzero(keep_mask(np.asarray(adv_N), min_abs, positive_only))
    plan = []
    for key_e in jax.random.split(key, epochs):
        order = kept[np.asarray(jax.random.permutation(key_e, len(kept)))] if len(kept) else kept
        plan += [order[i:i + minibatch_size] for i in range(0, len(order), minibatch_size)]
    return plan


def run_iteration(update_step: UpdateStep, state: TrainState, rollouts: Sequence[Any], adv_N, key,
                  config: EpochConfig = EpochConfig(), progress=None):
    """`epochs_per_iteration` epochs of minibatch updates over one iteration's rollouts.

    Returns (state, metrics): one dict of host floats per step taken, each with its bucket length
    `T` and its number of forward `rows`; the last dict has `stopped_on_kl` True when
    |kl_k1| > kl_stop ended the iteration early.
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

    # Every process knows all rollouts and the same plan: each packs the whole minibatch and hands
    # on the rows its own devices hold (multihost.global_batch).
    dp = data_parallel_size(update_step.mesh)

    def to_device(idx):
        T = bucket_length(int(lengths_N[idx].max()), config.buckets)
        batch = pack_minibatch([rollouts[i] for i in idx], adv_N[idx], M, T, pack=config.pack,
                               groups=uc.num_microbatches, multiple=dp)
        return multihost.global_batch(batch, update_step.batch_sharding), T, len(batch.tokens_RxT)

    history = []
    bar = progress(len(plan)) if progress is not None else None
    nxt = to_device(plan[0]) if plan else None
    for i in range(len(plan)):
        batch, T, R = nxt
        state, metrics = update_step(state, batch)
        # Pack and ship the next minibatch while this step runs; only then wait for its metrics.
        if i + 1 < len(plan):
            nxt = to_device(plan[i + 1])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(T=T, rows=R, stopped_on_kl=False)
        history.append(metrics)
        if bar is not None:
            bar.update(1)
        if metrics["nan_skips"] > config.max_nan_skips:
            raise RuntimeError(f"{int(metrics['nan_skips'])} update steps had a non-finite loss or "
                               f"gradient (limit {config.max_nan_skips}); training is diverging")
        if kl_stop(metrics["kl_k1"], config.kl_stop):
            metrics["stopped_on_kl"] = True
            break
    if bar is not None:
        bar.close()
    return state, history

"""The epoch driver of one LOOP iteration: filter, shuffle, bucket, pack, step, stop on KL.

A minibatch's rows are as long as the smallest bucket length that holds its longest rollout
(with `share_prefix`, its longest task tree, up to the largest bucket).
Rollouts are packed several to a forward row (`pack`, the default) into a few row counts per
bucket, so a run compiles the update step at most a few times per bucket; unpacked, each rollout
takes a row of its own. With `share_prefix` a task's rollouts stay together in a minibatch and
each microbatch holds their common prompt once (a tree row: loopjax.rollout.batch.tree_units).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from loopjax import multihost
from loopjax.config import EpochConfig
from loopjax.loop.objective import keep_mask, kl_stop
from loopjax.loop.update import TrainState, UpdateStep
from loopjax.rollout.batch import Rollout, pack_minibatch, tree_units
from loopjax.sharding import data_parallel_size

# More steps skipped for a non-finite loss or gradient than this means training diverged
MAX_NAN_SKIPS = 20


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a rollout of {length} tokens is longer than the largest bucket "
                     f"{buckets[-1]}; add a larger bucket to EpochConfig.buckets")


def _shuffled(key, x: np.ndarray) -> np.ndarray:
    return x[np.asarray(jax.random.permutation(key, len(x)))] if len(x) else x


def minibatch_plan(adv_N, lengths_N, key, *, minibatch_size: int, epochs: int, min_abs: float,
                   positive_only: bool, groups_N=None) -> list[np.ndarray]:
    """Index arrays of each minibatch, over all epochs: signal-free rollouts dropped, reshuffled
    across tasks every epoch; the last minibatch of an epoch may be short (padded when packed).
    With `groups_N` (each rollout's task) whole tasks are shuffled instead, each task's kept
    rollouts listed together (so that they can share their prompt: EpochConfig.share_prefix)."""
    kept = np.flatnonzero(keep_mask(np.asarray(adv_N), min_abs, positive_only))
    plan = []
    for key_e in jax.random.split(key, epochs):
        if groups_N is None:
            order = _shuffled(key_e, kept)
        else:
            tasks = np.asarray(groups_N)[kept]
            order = np.concatenate([kept[tasks == g] for g in _shuffled(key_e, np.unique(tasks))]
                                   or [kept])
        plan += [order[i:i + minibatch_size] for i in range(0, len(order), minibatch_size)]
    return plan


def run_iteration(update_step: UpdateStep, state: TrainState, rollouts: Sequence[Rollout], adv_N,
                  key, config: EpochConfig = EpochConfig(), progress=None):
    """`epochs_per_iteration` epochs of minibatch updates over one iteration's rollouts.

    Returns (state, metrics): one dict of host floats per step taken, each with its bucket length
    `T`, its number of forward `rows` and the `held_tokens` (not padding) in them; the last dict
    has `stopped_on_kl` True when |kl_k1| > kl_stop ended the iteration early.
    `progress(total)`, if given, makes a progress bar (with `update()` and `close()`) for the steps.
    """
    uc = update_step.config
    M = uc.minibatch_size
    adv_N = np.asarray(adv_N, np.float32)
    if len(adv_N) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(adv_N)} advantages")
    lengths_N = np.array([len(r.tokens) for r in rollouts])
    plan = minibatch_plan(adv_N, lengths_N, key, minibatch_size=M,
                          epochs=config.epochs_per_iteration, min_abs=uc.adv_min_abs,
                          positive_only=uc.adv_positive_only,
                          groups_N=np.array([r.group for r in rollouts]) if config.share_prefix
                          else None)

    # Every process knows all rollouts and the same plan: each packs the whole minibatch and hands
    # on the rows its own devices hold (multihost.global_batch).
    dp = data_parallel_size(update_step.mesh)

    def to_device(idx):
        need = int(lengths_N[idx].max())
        if config.share_prefix:  # rows that hold a whole task's tree where a bucket allows
            tree = max(n for _, _, n in tree_units(rollouts, idx, 1 << 62))
            need = max(need, min(tree, config.buckets[-1]))
        T = bucket_length(need, config.buckets)
        batch = pack_minibatch([rollouts[i] for i in idx], adv_N[idx], M, T, pack=config.pack,
                               microbatches=uc.num_microbatches, multiple=dp,
                               share_prefix=config.share_prefix)
        return (multihost.global_batch(batch, update_step.batch_sharding), T,
                batch.tokens_UxRxT.shape[0] * batch.tokens_UxRxT.shape[1],
                int(np.sum(batch.segment_ids_UxRxT > 0)))

    history = []
    bar = progress(len(plan)) if progress is not None else None
    nxt = to_device(plan[0]) if plan else None
    for i in range(len(plan)):
        batch, T, R, held = nxt
        state, metrics = update_step(state, batch)
        # Pack and ship the next minibatch while this step runs; only then wait for its metrics.
        if i + 1 < len(plan):
            nxt = to_device(plan[i + 1])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(T=T, rows=R, held_tokens=held, stopped_on_kl=False)
        history.append(metrics)
        if bar is not None:
            bar.update(1)
        if metrics["nan_skips"] > MAX_NAN_SKIPS:
            raise RuntimeError(f"{int(metrics['nan_skips'])} update steps had a non-finite loss or "
                               f"gradient (limit {MAX_NAN_SKIPS}); training is diverging")
        if kl_stop(metrics["kl_k1"], config.kl_stop):
            metrics["stopped_on_kl"] = True
            break
    if bar is not None:
        bar.close()
    return state, history

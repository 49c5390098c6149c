"""The data between the stages: a finished episode (Rollout) and the learner's packed Batch.

    rollouts, stats = collect(...)                       # loopjax.rollout.collector
    batch = pack_minibatch(rollouts, adv_N, M, T, pack=True, microbatches=U, multiple=dp)
    state, metrics = update_step(state, batch)           # loopjax.loop.update

One packer serves LOOP and the SFT warm start: sequences are placed first-fit into forward rows
of T tokens (several per row as segments, positions restarting), and the arrays come out
microbatch-major, [U microbatches, ...], with every index local to its microbatch, so the jitted
step scans over axis 0 and reads rows with no index arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import numpy as np


@dataclasses.dataclass
class Rollout:
    """One finished episode. The learner reads the token arrays, the reward and the group; the
    behaviour measures, turns and unit-test results the reports show are in `info`."""
    tokens: np.ndarray  # int32 [n]: the whole conversation, prompt included
    is_output: np.ndarray  # bool [n]: True on the tokens the policy generated (they carry the loss)
    logp: np.ndarray  # float32 [n]: behaviour log-probs of generated tokens (0 elsewhere)
    turn_id: np.ndarray  # int32 [n]: the agent turn each token belongs to
    reward: float  # share of the task's unit tests that pass, in [0, 1]
    success: bool  # every unit test passes
    task_id: str
    group: int  # which task of the iteration (rollouts of a group share a baseline)
    index: int = 0  # the episode's index in its collection (its PRNG identity)
    info: dict = dataclasses.field(default_factory=dict)  # turns, passes, failures, behaviour, ...


@flax.struct.dataclass
class Batch:
    """A packed minibatch, microbatch-major: U microbatches, each of R forward rows of T tokens
    holding its B = minibatch_size / U rollout slots.

    Forward rows [U, R, T]:
    tokens_UxRxT      int32  token ids; 0 on padding
    positions_UxRxT   int32  RoPE positions, restarting at 0 for each rollout of a row
    segment_ids_UxRxT int32  1, 2, ... for the rollouts of a row (attention stays inside one); 0 pad
    Rollout slots [U, B, T] / [U, B]:
    src_UxBxT         int32  where slot b's t-th token lies in its microbatch's rows: row * T + col
    mask_UxBxT        bool   True exactly on generated tokens (these carry the loss)
    logp_old_UxBxT    f32    behaviour log-probs on generated tokens (0 elsewhere)
    adv_UxB           f32    the rollout's advantage
    turn_ids_UxBxT    int32  turn index of each token, in [0, T) (used at level="turn")
    weight_UxB        f32    1 for a real rollout, 0 for an empty slot (the denominator stays M)
    """
    tokens_UxRxT: jax.Array
    positions_UxRxT: jax.Array
    segment_ids_UxRxT: jax.Array
    src_UxBxT: jax.Array
    mask_UxBxT: jax.Array
    logp_old_UxBxT: jax.Array
    adv_UxB: jax.Array
    turn_ids_UxBxT: jax.Array
    weight_UxB: jax.Array


def first_fit(lengths: Sequence[int], length: int, order: Sequence[int],
              max_rows: int | None = None) -> tuple[dict[int, tuple[int, int]], int]:
    """Places sequences (in `order`) into rows of `length` tokens: each goes to the first row with
    room, else a new row. With `max_rows`, placing stops at the first sequence that fits nowhere.
    Returns ({sequence: (row, offset)}, rows used)."""
    place: dict[int, tuple[int, int]] = {}
    fill: list[int] = []
    for i in order:
        if lengths[i] > length:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit rows of {length}")
        j = next((j for j, f in enumerate(fill) if f + lengths[i] <= length), len(fill))
        if j == len(fill):
            if max_rows is not None and j == max_rows:
                break
            fill.append(0)
        place[i] = (j, fill[j])
        fill[j] += lengths[i]
    return place, len(fill)


def forward_rows(lengths: Sequence[int], length: int, *, pack: bool, microbatches: int = 1,
                 multiple: int = 1, slots: int | None = None) -> tuple[int, list[tuple[int, int, int]]]:
    """Where each of a minibatch's rollouts goes: (R rows per microbatch,
    [(microbatch, row, offset) per rollout]).

    Rollout i takes slot i // U of microbatch i % U (U = `microbatches`). Unpacked, it is that
    slot's own row (R = slots / U). Packed, each microbatch's rollouts fill rows first-fit, longest
    first; every microbatch gets the same R, rounded up to a quarter of its slots so that a run
    compiles a few row counts per bucket. R is a multiple of `multiple` (the data-parallel size,
    so that each microbatch's rows split evenly over the devices; empty rows pad it).
    """
    slots = len(lengths) if slots is None else slots
    per_micro = slots // microbatches
    most = -(-per_micro // multiple) * multiple
    if not pack:
        return most, [(i % microbatches, i // microbatches, 0) for i in range(len(lengths))]
    quantum = -(-max(per_micro // 4, 1) // multiple) * multiple
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    need = 1
    for u in range(microbatches):
        members = sorted(range(u, len(lengths), microbatches), key=lambda i: -lengths[i])
        place, rows = first_fit(lengths, length, members)
        for i, (row, off) in place.items():
            out[i] = (u, row, off)
        need = max(need, rows)
    return min(-(-need // quantum) * quantum, most), out


def _write(rollouts: Sequence[Rollout], where, adv_N, microbatches: int, rows: int, slots: int,
           length: int) -> Batch:
    """The Batch arrays with rollout i at where[i] = (microbatch, row, offset), in slot i // U."""
    U, B, T = microbatches, slots // microbatches, length
    tokens, positions, segments = (np.zeros((U, rows, T), np.int32) for _ in range(3))
    src, turns = np.zeros((U, B, T), np.int32), np.zeros((U, B, T), np.int32)
    mask, logp = np.zeros((U, B, T), bool), np.zeros((U, B, T), np.float32)
    adv, weight = np.zeros((U, B), np.float32), np.zeros((U, B), np.float32)
    for i, r in enumerate(rollouts):
        n = len(r.tokens)
        turn = np.asarray(r.turn_id, np.int32)
        if n and (turn.min() < 0 or turn.max() >= T):
            raise ValueError(f"rollout {i}: turn ids must lie in [0, {T}), got "
                             f"[{turn.min()}, {turn.max()}]")
        u, row, off = where[i]
        b = i // U
        tokens[u, row, off:off + n] = r.tokens
        positions[u, row, off:off + n] = np.arange(n)
        segments[u, row, off:off + n] = segments[u, row].max() + 1
        src[u, b, :n] = row * T + off + np.arange(n)
        mask[u, b, :n] = r.is_output
        logp[u, b, :n] = r.logp
        turns[u, b, :n] = turn
        adv[u, b] = adv_N[i]
        weight[u, b] = 1.0
    return Batch(tokens, positions, segments, src, mask, logp, adv, turns, weight)


def pack_minibatch(rollouts: Sequence[Rollout], adv_N, slots: int, length: int, *,
                   pack: bool = False, microbatches: int = 1, multiple: int = 1) -> Batch:
    """A NumPy Batch of `slots` rollout slots (the minibatch size M; slots past len(rollouts) are
    weight-0 padding) in rows of `length` tokens, split into `microbatches` (`forward_rows`)."""
    if len(rollouts) > slots:
        raise ValueError(f"{len(rollouts)} rollouts do not fit a minibatch of {slots} rows")
    if slots % microbatches:
        raise ValueError(f"a minibatch of {slots} rows does not split into {microbatches} microbatches")
    lengths = [len(r.tokens) for r in rollouts]
    for i, n in enumerate(lengths):
        if n > length:
            raise ValueError(f"rollout {i} has {n} tokens, more than the row length {length}")
    rows, where = forward_rows(lengths, length, pack=pack, microbatches=microbatches,
                               multiple=multiple, slots=slots)
    return _write(rollouts, where, np.asarray(adv_N, np.float32), microbatches, rows, slots, length)


def pack_demonstrations(rollouts: Sequence[Rollout], order: Sequence[int], rows: int, length: int,
                        slots: int) -> tuple[Batch, int]:
    """The warm start's batch: rollouts taken from the front of `order` into `rows` rows first-fit
    until one fits nowhere (or `slots` are full); returns (Batch with U = 1, how many were used)."""
    lengths = [len(r.tokens) for r in rollouts]
    place, _ = first_fit(lengths, length, list(order[:slots]), max_rows=rows)
    used = len(place)
    chosen = [rollouts[j] for j in order[:used]]
    where = [(0, *place[j]) for j in order[:used]]
    return _write(chosen, where, np.zeros(used, np.float32), 1, rows, slots, length), used

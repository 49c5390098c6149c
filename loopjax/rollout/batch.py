"""The data between the stages: a finished episode (Rollout) and the learner's packed Batch.

    rollouts, summary = collect(...)                     # loopjax.rollout.collector
    batch = pack_minibatch(rollouts, adv_N, M, T, pack=True, microbatches=U, multiple=dp)
    state, metrics = update_step(state, batch)           # loopjax.loop.update

One packer serves LOOP and the SFT warm start: sequences are placed first-fit into forward rows
of T tokens (several per row as segments, positions restarting), and the arrays come out
microbatch-major, [U microbatches, ...], with every index local to its microbatch, so the jitted
step scans over axis 0 and reads rows with no index arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from loopjax.envs.base import EpisodeRecord


@dataclasses.dataclass
class Rollout:
    """One finished episode. The learner reads the token arrays, the reward and the group; the
    turns, unit-test results and end reason that reports and behaviour measures read are in
    `episode`."""
    tokens: np.ndarray  # int32 [n]: the whole conversation, prompt included
    is_output: np.ndarray  # bool [n]: True on the tokens the policy generated (they carry the loss)
    logp: np.ndarray  # float32 [n]: behaviour log-probs of generated tokens (0 elsewhere)
    turn_id: np.ndarray  # int32 [n]: the agent turn each token belongs to
    reward: float  # share of the task's unit tests that pass, in [0, 1]
    success: bool  # every unit test passes
    task_id: str
    group: int  # which task of the iteration (rollouts of a group share a baseline)
    index: int = 0  # the episode's index in its collection (its PRNG identity)
    episode: EpisodeRecord | None = None  # None for rollouts made without an environment

    @property
    def num_generated(self) -> int:
        return int(np.sum(self.is_output))


@flax.struct.dataclass
class Batch:
    """A packed minibatch, microbatch-major: U microbatches, each of R forward rows of T tokens
    holding its B = minibatch_size / U rollout slots.

    Forward rows [U, R, T]:
    tokens_UxRxT      int32  token ids; 0 on padding
    positions_UxRxT   int32  RoPE positions, restarting at 0 for each rollout of a row (a branch of
                             a tree continues from its prefix)
    segment_ids_UxRxT int32  1, 2, ... for the rollouts of a row (attention stays inside one); 0 pad
    prefix_ids_UxRxT  int32  the segment of a shared prompt each token also attends to (0: none;
                             `pack_minibatch(share_prefix=True)` makes a task's rollouts a tree)
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
    prefix_ids_UxRxT: jax.Array
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


def _row_count(need: int, per_micro: int, multiple: int) -> int:
    """R for rows needing `need` rows: rounded up to a quarter of a microbatch's slots (so a run
    compiles a few row counts per bucket), at most the slots (one row each), a multiple of
    `multiple` (the data-parallel size: each microbatch's rows split evenly over the devices)."""
    most = -(-per_micro // multiple) * multiple
    quantum = -(-max(per_micro // 4, 1) // multiple) * multiple
    return min(-(-max(need, 1) // quantum) * quantum, most)


def forward_rows(lengths: Sequence[int], length: int, *, pack: bool, microbatches: int = 1,
                 multiple: int = 1,
                 slots: int | None = None) -> tuple[int, list[tuple[int, int, int]]]:
    """Where each of a minibatch's rollouts goes: (R rows per microbatch,
    [(microbatch, row, offset) per rollout]).

    Rollout i takes slot i // U of microbatch i % U (U = `microbatches`). Unpacked, it is that
    slot's own row (R = slots / U). Packed, each microbatch's rollouts fill rows first-fit, longest
    first, and every microbatch gets the same R (`_row_count`).
    """
    slots = len(lengths) if slots is None else slots
    per_micro = slots // microbatches
    if not pack:
        return (-(-per_micro // multiple) * multiple,
                [(i % microbatches, i // microbatches, 0) for i in range(len(lengths))])
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    need = 1
    for u in range(microbatches):
        members = sorted(range(u, len(lengths), microbatches), key=lambda i: -lengths[i])
        place, rows = first_fit(lengths, length, members)
        for i, (row, off) in place.items():
            out[i] = (u, row, off)
        need = max(need, rows)
    return _row_count(need, per_micro, multiple), out


def shared_prefix(rollouts: Sequence[Rollout]) -> int:
    """L: how many leading tokens rollouts of one task can hold once, in a tree row (a prefix,
    then each rollout's tokens [L, n) as a branch that attends to it). Tokens [0, L) are the same
    in all of them, and token L, each branch's first, is one the policy did not generate in any:
    a branch's first token gets no log-prob in its row (its context's last token is the prefix's).
    0 for fewer than two rollouts."""
    if len(rollouts) < 2:
        return 0
    n = min(len(r.tokens) for r in rollouts)
    first = np.asarray(rollouts[0].tokens[:n])
    same = np.ones(n, bool)
    for r in rollouts[1:]:
        same &= np.asarray(r.tokens[:n]) == first
    common = n if same.all() else int(np.argmin(same))
    first_output = min(int(np.argmax(r.is_output)) if np.any(r.is_output) else len(r.tokens)
                       for r in rollouts)
    return max(0, min(common, first_output - 1, n - 1))


def tree_units(rollouts: Sequence[Rollout], members: Sequence[int], length: int):
    """The rollouts `members` (of one microbatch) as tree units [(member list, L, tokens)]: those of
    one task (`group`) share their prefix (`shared_prefix`), split where a unit would outgrow
    rows of `length` tokens."""
    by_group: dict[int, list[int]] = {}
    for i in members:
        by_group.setdefault(rollouts[i].group, []).append(i)
    units = []

    def unit(idx):
        L = shared_prefix([rollouts[i] for i in idx])
        return idx, L, L + sum(len(rollouts[i].tokens) - L for i in idx)

    for idx in by_group.values():
        cur: list[int] = []
        for i in idx:
            if cur and unit(cur + [i])[2] > length:
                units.append(unit(cur))
                cur = []
            cur.append(i)
        units.append(unit(cur))
    return units


def _write(rollouts: Sequence[Rollout], units, slot_of, adv_N, microbatches: int, rows: int,
           slots: int, length: int) -> Batch:
    """The Batch arrays. units = [(microbatch, row, offset, members, L)]: the members' rollouts
    placed from `offset` of that row, their first L tokens once as a shared prefix (L = 0: each
    rollout a plain segment); rollout i takes slot slot_of[i] of its microbatch."""
    U, B, T = microbatches, slots // microbatches, length
    tokens, positions, segments, prefixes = (np.zeros((U, rows, T), np.int32) for _ in range(4))
    src, turns = np.zeros((U, B, T), np.int32), np.zeros((U, B, T), np.int32)
    mask, logp = np.zeros((U, B, T), bool), np.zeros((U, B, T), np.float32)
    adv, weight = np.zeros((U, B), np.float32), np.zeros((U, B), np.float32)

    def put(u, row, at, values, start):  # a new segment at `at`; returns its id
        seg = segments[u, row].max() + 1
        n = len(values)
        tokens[u, row, at:at + n] = values
        positions[u, row, at:at + n] = start + np.arange(n)
        segments[u, row, at:at + n] = seg
        return seg

    for u, row, off, members, L in units:
        pre = put(u, row, off, rollouts[members[0]].tokens[:L], 0) if L else 0
        at = off + L
        for i in members:
            r = rollouts[i]
            n = len(r.tokens)
            turn = np.asarray(r.turn_id, np.int32)
            if n and (turn.min() < 0 or turn.max() >= T):
                raise ValueError(f"rollout {i}: turn ids must lie in [0, {T}), got "
                                 f"[{turn.min()}, {turn.max()}]")
            put(u, row, at, r.tokens[L:], L)
            prefixes[u, row, at:at + n - L] = pre
            b = slot_of[i]
            src[u, b, :L] = row * T + off + np.arange(L)
            src[u, b, L:n] = row * T + at + np.arange(n - L)
            at += n - L
            mask[u, b, :n] = r.is_output
            logp[u, b, :n] = r.logp
            turns[u, b, :n] = turn
            adv[u, b] = adv_N[i]
            weight[u, b] = 1.0
    return Batch(tokens, positions, segments, prefixes, src, mask, logp, adv, turns, weight)


def pack_minibatch(rollouts: Sequence[Rollout], adv_N, slots: int, length: int, *,
                   pack: bool = False, microbatches: int = 1, multiple: int = 1,
                   share_prefix: bool = False) -> Batch:
    """A NumPy Batch of `slots` rollout slots (the minibatch size M; slots past len(rollouts) are
    weight-0 padding) in rows of `length` tokens, split into `microbatches` (`forward_rows`).

    share_prefix: rollouts of one task (`group`) in one microbatch become a tree (`tree_units`):
    their common prompt is held and computed once. Rollout i then takes slot i % B of microbatch
    i // B (B = slots / U), so that a task's rollouts, listed together, share a microbatch."""
    if len(rollouts) > slots:
        raise ValueError(f"{len(rollouts)} rollouts do not fit a minibatch of {slots} rows")
    if slots % microbatches:
        raise ValueError(f"a minibatch of {slots} rows does not split into {microbatches} "
                         "microbatches")
    lengths = [len(r.tokens) for r in rollouts]
    for i, n in enumerate(lengths):
        if n > length:
            raise ValueError(f"rollout {i} has {n} tokens, more than the row length {length}")
    adv_N = np.asarray(adv_N, np.float32)
    U = microbatches
    if not share_prefix:
        rows, where = forward_rows(lengths, length, pack=pack, microbatches=U,
                                   multiple=multiple, slots=slots)
        units = [(u, row, off, [i], 0) for i, (u, row, off) in enumerate(where)]
        return _write(rollouts, units, [i // U for i in range(len(rollouts))], adv_N, U, rows,
                      slots, length)
    B = slots // U
    units, need = [], 1
    for u in range(U):
        tree = tree_units(rollouts, range(u * B, min((u + 1) * B, len(rollouts))), length)
        place, used = first_fit([n for _, _, n in tree], length,
                                sorted(range(len(tree)), key=lambda j: -tree[j][2]))
        units += [(u, *place[j], idx, L) for j, (idx, L, _) in enumerate(tree)]
        need = max(need, used)
    return _write(rollouts, units, [i % B for i in range(len(rollouts))], adv_N, U,
                  _row_count(need, B, multiple), slots, length)


def pack_demonstrations(rollouts: Sequence[Rollout], order: Sequence[int], rows: int, length: int,
                        slots: int) -> tuple[Batch, int]:
    """The warm start's batch: rollouts taken from the front of `order` into `rows` rows first-fit
    until one fits nowhere (or `slots` are full); returns (Batch with U = 1, how many were used)."""
    lengths = [len(r.tokens) for r in rollouts]
    place, _ = first_fit(lengths, length, list(order[:slots]), max_rows=rows)
    used = len(place)
    chosen = [rollouts[j] for j in order[:used]]
    units = [(0, *place[j], [k], 0) for k, j in enumerate(order[:used])]
    return _write(chosen, units, list(range(used)), np.zeros(used, np.float32), 1, rows, slots,
                  length), used

"""The packer: rollouts into forward rows (segments, shared prompts, microbatches), read back
exactly, and an update on packed rows equal to one on a rollout per row."""

import jax
import numpy as np
import pytest

from loopjax.config import EpochConfig
from loopjax.rollout.batch import forward_rows, pack_minibatch
from loopjax.sharding import make_mesh
from update_fixtures import (
    assert_trees_close,
    lora_update,
    make,
    one_device_mesh,
    random_rollouts,
    run_steps,
    shared_prompt_rollouts,
)


@pytest.mark.parametrize("micro", [1, 2])
def test_forward_rows_packs_within_microbatches(micro):
    lengths = [30, 5, 12, 17, 9, 31, 2, 14, 16, 8]
    R, place = forward_rows(lengths, 32, pack=True, microbatches=micro, slots=12)
    used = {}
    for i, (u, row, off) in enumerate(place):
        assert u == i % micro and 0 <= off and off + lengths[i] <= 32 and row < R
        for col in range(off, off + lengths[i]):
            assert (u, row, col) not in used, "two rollouts overlap"
            used[u, row, col] = i
    assert R * micro < 12  # fewer rows than one per rollout
    unpacked, place = forward_rows(lengths, 32, pack=False, microbatches=micro, slots=12)
    assert unpacked == 12 // micro and place == [(i % micro, i // micro, 0) for i in range(10)]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_packed_batch_reads_back_every_rollout(pack, micro):
    """The packer's contract, microbatch by microbatch: slot b of microbatch u holds rollout
    b * U + u, whose tokens its local indices read back from that microbatch's own rows, with
    positions 0..n-1 and one segment id of its own; empty slots weigh 0."""
    rollouts = random_rollouts(5, 7, min_len=3, max_len=14)
    adv = np.arange(1, 8, dtype=np.float32)
    batch = pack_minibatch(rollouts, adv, 8, 32, pack=pack, microbatches=micro)
    U, R, T = batch.tokens_UxRxT.shape
    assert (U, T) == (micro, 32) and batch.adv_UxB.shape == (micro, 8 // micro)
    for i, r in enumerate(rollouts):
        u, b, n = i % micro, i // micro, len(r.tokens)
        at = batch.src_UxBxT[u, b, :n]
        np.testing.assert_array_equal(batch.tokens_UxRxT[u].reshape(-1)[at], r.tokens)
        np.testing.assert_array_equal(batch.positions_UxRxT[u].reshape(-1)[at], np.arange(n))
        segment = batch.segment_ids_UxRxT[u].reshape(-1)[at]
        assert segment.min() == segment.max() > 0
        assert np.sum(batch.segment_ids_UxRxT[u].reshape(-1) == segment[0]) >= n
        np.testing.assert_array_equal(batch.mask_UxBxT[u, b, :n], r.is_output)
        np.testing.assert_array_equal(batch.logp_old_UxBxT[u, b, :n], r.logp)
        assert batch.adv_UxB[u, b] == adv[i] and batch.weight_UxB[u, b] == 1.0
    # each segment is one rollout: a row's segment ids count its rollouts
    for u in range(U):
        rows_used = {int(x) // T for i in range(u, 7, micro)
                     for x in batch.src_UxBxT[u, i // micro, :1]}
        for row in rows_used:
            ids = set(batch.segment_ids_UxRxT[u, row].tolist()) - {0}
            assert len(ids) == sum(int(batch.src_UxBxT[u, i // micro, 0]) // T == row
                                   for i in range(u, 7, micro))
    assert batch.weight_UxB.sum() == 7 and (R < 8 // micro) == pack


@pytest.mark.parametrize("micro", [1, 2])
def test_tree_rows_hold_each_prompt_once(micro):
    """share_prefix: slot i % B of microbatch i // B reads back rollout i (tokens, positions
    0..n-1); a task's rollouts in one microbatch hold their prompt once, up to (not into) their
    first generated token; their branches attend to it (prefix ids), other tasks' do not."""
    rollouts = shared_prompt_rollouts()  # groups 0, 0, 0, 1, 1, 2
    adv = np.arange(1, 7, dtype=np.float32)
    batch = pack_minibatch(rollouts, adv, 8, 64, pack=True, microbatches=micro, share_prefix=True)
    U, R, T = batch.tokens_UxRxT.shape
    B = 8 // micro
    held = 0
    for u in range(U):
        members = range(u * B, min((u + 1) * B, 6))
        expect = sum(len(rollouts[i].tokens) for i in members)
        for g in {rollouts[i].group for i in members}:
            same = [rollouts[i] for i in members if rollouts[i].group == g]
            if len(same) > 1:  # L = the prompt minus its last token (9, 7: see the rollouts)
                expect -= (len(same) - 1) * ({0: 9, 1: 7}[g] - 1)
        held += expect
        assert np.sum(batch.segment_ids_UxRxT[u] > 0) == expect
        for i in members:
            r, b, n = rollouts[i], i % B, len(rollouts[i].tokens)
            at = batch.src_UxBxT[u, b, :n]
            np.testing.assert_array_equal(batch.tokens_UxRxT[u].reshape(-1)[at], r.tokens)
            np.testing.assert_array_equal(batch.positions_UxRxT[u].reshape(-1)[at], np.arange(n))
            np.testing.assert_array_equal(batch.mask_UxBxT[u, b, :n], r.is_output)
            assert batch.adv_UxB[u, b] == adv[i]
            seg, pre = (x[u].reshape(-1)[at] for x in (batch.segment_ids_UxRxT,
                                                         batch.prefix_ids_UxRxT))
            L = int(np.argmax(seg != seg[0])) if pre.max() else 0  # where its branch starts
            if L:  # the prompt's tokens [0, L) in the prefix segment, the rest in its branch
                assert np.all(seg[:L] == seg[0]) and np.all(pre[:L] == 0)
                assert np.all(seg[L:] == seg[L]) and np.all(pre[L:] == seg[0])
                assert not r.is_output[:L + 1].any()
    assert held < sum(len(r.tokens) for r in rollouts)
    with pytest.raises(ValueError, match="pack=True"):
        EpochConfig(pack=False, share_prefix=True)


def test_tree_units_split_at_the_row_length():
    from loopjax.rollout.batch import tree_units  # noqa: PLC0415
    rollouts = shared_prompt_rollouts()
    (whole, L, n), *_ = tree_units(rollouts, range(6), 64)
    assert whole == [0, 1, 2] and L == 8
    assert n == 8 + sum(len(rollouts[i].tokens) - 8 for i in whole)
    short = max(len(rollouts[i].tokens) for i in range(3)) + 4  # room for one rollout and a bit
    units = tree_units(rollouts, range(3), short)
    assert [u[0] for u in units] == [[0], [1], [2]] and all(u[2] <= short for u in units)


@pytest.mark.parametrize("level,mesh_shape,micro", [("token", "1,1,1", 0), ("turn", "1,1,1", 2),
                                                     ("trajectory", "1,1,1", 4),
                                                     ("token", "2,2,2", 4)])
def test_packed_rows_match_one_rollout_per_row(level, mesh_shape, micro):
    """Several rollouts per forward row (segments) give the loss, metrics and update of one
    rollout per row."""
    config = lora_update(level=level, minibatch_size=8, microbatch_size=micro, learning_rate=1e-3)
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:mesh_shape.count("2") and 8 or 1])
    rollouts = random_rollouts(11, 7, min_len=3, max_len=14)  # 7 of 8 slots: one empty
    adv = np.random.default_rng(3).normal(size=7).astype(np.float32)
    micro = config.num_microbatches
    dp = 4 if mesh_shape == "2,2,2" else 1  # rows per microbatch split evenly over dp devices
    packed = pack_minibatch(rollouts, adv, 8, 32, pack=True, microbatches=micro, multiple=dp)
    plain = pack_minibatch(rollouts, adv, 8, 32, microbatches=micro, multiple=dp)
    rows, one_per_row = packed.tokens_UxRxT.shape[1], plain.tokens_UxRxT.shape[1]
    assert rows < one_per_row == 8 // micro if dp == 1 else rows <= one_per_row
    a, ma = run_steps(config, mesh, [plain])
    b, mb = run_steps(config, mesh, [packed])
    assert_trees_close(a, b)
    for k in ("loss", "grad_norm", "kl_k1", "clip_fraction", "num_tokens", "num_rollouts"):
        np.testing.assert_allclose(ma[0][k], mb[0][k], rtol=1e-5, atol=1e-7)


def test_batch_of_another_microbatch_split_is_refused():
    state, step = make(lora_update(minibatch_size=8, microbatch_size=4), one_device_mesh())
    rollouts = random_rollouts(12, 8)
    batch = pack_minibatch(rollouts, np.ones(8, np.float32), 8, 16, pack=True, microbatches=1)
    with pytest.raises(ValueError, match="microbatches=2"):
        step(state, batch)

"""LOOP advantages and policy loss against plain NumPy loop references, jitted and not."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.loop import advantages, keep_mask, policy_loss

# --------------------------------------------------------------------------- NumPy references


def ref_advantages(rewards, baseline, normalize_std):
    rewards = np.asarray(rewards, np.float64)
    G, K = rewards.shape
    return ref_ragged_advantages(rewards.reshape(-1), np.repeat(np.arange(G), K), baseline,
                                 normalize_std).reshape(G, K)


def ref_ragged_advantages(rewards_N, group_ids_N, baseline, normalize_std):
    """Loops over groups and their members; a group of one rollout gets A = 0."""
    out = np.zeros(len(rewards_N))
    for g in set(int(i) for i in group_ids_N):
        members = [i for i in range(len(rewards_N)) if group_ids_N[i] == g]
        R = [float(rewards_N[i]) for i in members]
        K = len(R)
        if K < 2:
            continue
        mean = sum(R) / K
        std = math.sqrt(sum((r - mean) ** 2 for r in R) / K)
        for k, i in enumerate(members):
            if baseline == "rft":
                out[i] = 1.0 if R[k] >= 1.0 else 0.0
                continue
            if baseline == "leave_one_out":
                out[i] = R[k] - sum(R[j] for j in range(K) if j != k) / (K - 1)
            else:
                out[i] = R[k] - mean
            if normalize_std:
                out[i] /= max(std, 1e-6)
    return out


def ref_clip(r, clip_form, eps):
    if clip_form is None:
        return r, False
    low, high = (1 / (1 + eps), 1 + eps) if clip_form == "reference" else (1 - eps, 1 + eps)
    return min(max(r, low), high), (r < low or r > high)


def ref_loss(logp_new, logp_old, adv, mask, turn_ids, level, clip_form, eps, denom):
    """Explicit loops over rollouts, turns and tokens; returns (loss, clip_fraction, kl_k1)."""
    B, T = mask.shape
    total, clipped, units, log_ws = 0.0, 0, 0, []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        if not toks:
            continue
        log_w = sum(float(logp_new[b, t]) - float(logp_old[b, t]) for t in toks)
        log_ws.append(log_w)
        if level == "token":
            groups = [[t] for t in toks]
        elif level == "turn":
            by_turn = {}
            for t in toks:
                by_turn.setdefault(int(turn_ids[b, t]), []).append(t)
            groups = list(by_turn.values())
        else:
            groups = [toks]
        term = 0.0
        for grp in groups:
            r = math.exp(sum(float(logp_new[b, t]) - float(logp_old[b, t]) for t in grp))
            rc, was_clipped = ref_clip(r, clip_form, eps)
            term += min(r * adv[b], rc * adv[b])
            clipped += was_clipped
            units += 1
        total += term / len(groups)
    loss = -total / denom
    return loss, clipped / max(units, 1), (-sum(log_ws) / len(log_ws) if log_ws else 0.0)


# --------------------------------------------------------------------------- data


def random_batch(seed, B=6, T=12, num_turns=3, empty_rows=(4,), scale=0.3):
    rng = np.random.default_rng(seed)
    logp_old = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    logp_new = (logp_old + rng.normal(0, scale, (B, T))).astype(np.float32)
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = False  # the first token is always a prompt token
    for b in empty_rows:
        mask[b] = False
    turn_ids = np.sort(rng.integers(0, num_turns, (B, T)), axis=1).astype(np.int32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    return logp_new, logp_old, adv, mask, turn_ids


VARIANTS = [(level, form) for level in ("token", "turn", "trajectory")
            for form in ("reference", "paper", None)]


class PolicyLossTest(chex.TestCase):

    def _check(self, fn, data, level, form, eps=0.1, denom=None, atol=1e-5):
        logp_new, logp_old, adv, mask, turn_ids = data
        loss, aux = fn(jnp.asarray(logp_new), jnp.asarray(logp_old), jnp.asarray(adv),
                       jnp.asarray(mask), jnp.asarray(turn_ids))
        want, want_clip, want_k1 = ref_loss(logp_new, logp_old, adv, mask, turn_ids, level, form,
                                            eps, denom or mask.shape[0])
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(float(aux["clip_fraction"]), want_clip, atol=1e-6)
        np.testing.assert_allclose(float(aux["kl_k1"]), want_k1, rtol=1e-5, atol=1e-5)
        self.assertTrue(np.isfinite(float(aux["kl_k3"])))
        return loss, aux

    def _fn(self, level, form, eps=0.1, denom=None):
        return self.variant(lambda a, b, c, d, e: policy_loss(
            a, b, c, d, level=level, clip_eps=eps, clip_form=form, turn_ids_BxT=e,
            loss_denominator=denom))

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_all_variants(self):
        for level, form in VARIANTS:
            fn = self._fn(level, form, denom=32)
            for seed in range(3):
                data = random_batch(seed, scale=0.05 if level == "trajectory" else 0.3)
                self._check(fn, data, level, form, denom=32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_advantages_zero(self):
        logp_new, logp_old, _, mask, turn_ids = random_batch(1)
        adv = np.zeros(6, np.float32)
        for level, form in VARIANTS:
            loss, _ = self._check(self._fn(level, form), (logp_new, logp_old, adv, mask, turn_ids),
                                  level, form)
            self.assertEqual(float(loss), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ratio_on_clip_edges(self):
        # One generated token per rollout with r exactly on an edge of each clip range.
        eps = 0.1
        edges = [1 + eps, 1 / (1 + eps), 1 - eps]
        logp_old = np.full((6, 3), -1.0, np.float32)
        logp_new = logp_old.copy()
        for b, r in enumerate(edges + edges):
            logp_new[b, 1] = np.float32(-1.0 + math.log(r))
        mask = np.zeros((6, 3), bool)
        mask[:, 1] = True
        adv = np.array([1, 1, 1, -1, -1, -1], np.float32)
        turn_ids = np.zeros((6, 3), np.int32)
        for level, form in VARIANTS:
            self._check(self._fn(level, form, eps), (logp_new, logp_old, adv, mask, turn_ids),
                        level, form, eps)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rollout_without_tokens_is_exactly_zero(self):
        logp_new, logp_old, adv, mask, turn_ids = random_batch(2)
        mask[:] = False
        logp_new[:] = -np.inf  # garbage at masked positions must not leak
        for level, form in VARIANTS:
            fn = self._fn(level, form)
            loss, aux = fn(jnp.asarray(logp_new), jnp.asarray(logp_old), jnp.asarray(adv),
                           jnp.asarray(mask), jnp.asarray(turn_ids))
            self.assertEqual(float(loss), 0.0)
            for key in ("clip_fraction", "kl_k1", "kl_k3"):
                self.assertEqual(float(aux[key]), 0.0)
            grad = jax.grad(lambda x: fn(  # noqa: B023 (run at once)
                x, jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask),
                jnp.asarray(turn_ids))[0])(jnp.zeros_like(jnp.asarray(logp_new)))
            np.testing.assert_array_equal(np.asarray(grad), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_gradient_matches_closed_form(self):
        logp_new, logp_old, adv, mask, turn_ids = random_batch(3, scale=0.3)
        eps, M = 0.1, 32
        for form in ("reference", "paper", None):
            fn = self._fn("token", form, eps, M)
            grad = np.asarray(jax.grad(lambda x: fn(  # noqa: B023 (run at once)
                x, jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask),
                jnp.asarray(turn_ids))[0])(jnp.asarray(logp_new)))
            # d/dlogp_new_t of -(1/M) (1/n_b) min(r A, clip(r) A) = -(1/M)(1/n_b) r A when the
            # unclipped branch is active, 0 when clipping holds r at a bound in A's direction.
            want = np.zeros_like(grad)
            low, high = {"reference": (1 / (1 + eps), 1 + eps), "paper": (1 - eps, 1 + eps),
                         None: (-np.inf, np.inf)}[form]
            for b in range(mask.shape[0]):
                n = mask[b].sum()
                for t in range(mask.shape[1]):
                    if not mask[b, t]:
                        continue
                    r = math.exp(float(logp_new[b, t]) - float(logp_old[b, t]))
                    active = not ((adv[b] > 0 and r > high) or (adv[b] < 0 and r < low))
                    want[b, t] = -r * adv[b] / (M * n) if active else 0.0
            np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


class AdvantagesTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_against_reference(self):
        rng = np.random.default_rng(0)
        rewards = rng.random((5, 6)).astype(np.float32)
        rewards[0] = 0.5  # all equal
        rewards[1] = [0, 1, 0, 0, 0, 0]
        for baseline in ("leave_one_out", "leave_none_out"):
            for norm in (False, True):
                got = self.variant(lambda r: advantages(
                    r, baseline, norm))(rewards)  # noqa: B023 (run at once)
                np.testing.assert_allclose(np.asarray(got), ref_advantages(rewards, baseline, norm),
                                           rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(np.asarray(got)[0], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_k_equals_two(self):
        rewards = np.array([[1.0, 0.0], [0.25, 0.75], [0.3, 0.3]], np.float32)
        got = self.variant(lambda r: advantages(r))(rewards)
        # LOO with K=2: A_1 = R_1 - R_2.
        np.testing.assert_allclose(np.asarray(got), [[1, -1], [-0.5, 0.5], [0, 0]], atol=1e-6)
        grpo = self.variant(lambda r: advantages(r, "leave_none_out", True))(rewards)
        np.testing.assert_allclose(np.asarray(grpo), [[1, -1], [-1, 1], [0, 0]], atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ragged_groups_against_reference(self):
        """Groups of 1, 2, 3 and 6 rollouts, interleaved, with gaps in the ids: the per-iteration
        form train.py uses once stragglers are cut and failed environments dropped."""
        rng = np.random.default_rng(1)
        ids = np.array([7] * 6 + [2] * 3 + [0] + [4, 4] + [9] * 4 + [11], np.int32)
        ids = ids[rng.permutation(len(ids))]
        rewards = rng.random(len(ids)).astype(np.float32)
        rewards[ids == 9] = 0.5  # all equal: A = 0 exactly, with and without normalize_std
        rewards[ids == 4] = [1.0, 0.0]
        rewards[np.flatnonzero(ids == 7)[:2]] = 1.0
        for baseline in ("leave_one_out", "leave_none_out", "rft"):
            for norm in (False, True):
                got = self.variant(lambda r, g: advantages(
                    r, baseline, norm, group_ids_N=g))(rewards, ids)  # noqa: B023 (run at once)
                want = ref_ragged_advantages(rewards, ids, baseline, norm)
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(np.asarray(got)[(ids == 0) | (ids == 11)], 0.0)
                if baseline != "rft":
                    np.testing.assert_array_equal(np.asarray(got)[ids == 9], 0.0)
        # The GxK form is the ragged form with group ids 0..G-1, K each.
        rewards_GxK = rng.random((4, 5)).astype(np.float32)
        np.testing.assert_array_equal(
            np.asarray(advantages(rewards_GxK)).reshape(-1),
            np.asarray(advantages(rewards_GxK.reshape(-1), group_ids_N=np.repeat(np.arange(4), 5))))
        self.assertEqual(advantages(np.zeros(0, np.float32), group_ids_N=np.zeros(0)).shape, (0,))

    def test_bad_input_errors(self):
        with pytest.raises(ValueError, match="K >= 2"):
            advantages(np.ones((3, 1)))
        with pytest.raises(ValueError, match=r"\[G tasks, K rollouts\]"):
            advantages(np.ones(6))
        with pytest.raises(ValueError, match="baseline"):
            advantages(np.ones((2, 2)), baseline="mean")
        with pytest.raises(ValueError, match="same length"):
            advantages(np.ones(6), group_ids_N=np.zeros(5, np.int32))
        with pytest.raises(ValueError, match="clip_form"):
            policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones((1, 2)),
                        clip_form="both")
        with pytest.raises(ValueError, match="turn_ids"):
            policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones((1, 2)),
                        level="turn")

    def test_keep_mask(self):
        adv = jnp.array([0.0, 0.005, -0.005, 0.01, -0.5, 0.3])
        np.testing.assert_array_equal(keep_mask(adv), [0, 0, 0, 1, 1, 1])
        np.testing.assert_array_equal(keep_mask(adv, positive_only=True), [0, 0, 0, 1, 0, 1])
        np.testing.assert_array_equal(keep_mask(adv, min_abs=0.2), [0, 0, 0, 0, 1, 1])
        # The same mask on the host: the batch planner and the train metrics get NumPy back.
        host = keep_mask(np.asarray(adv), positive_only=True)
        self.assertIsInstance(host, np.ndarray)
        np.testing.assert_array_equal(host, [0, 0, 0, 1, 0, 1])

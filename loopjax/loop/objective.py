"""LOOP's objective in one file: advantages, the |A| filter, the clipped surrogate and the guards.

Rollout i of task group g(i) earns reward R_i in [0, 1]; n_g rollouts share group g (K per task
when none were cut or failed). Every generated token of rollout i gets its rollout's advantage:

    leave_one_out (LOOP, RLOO)   A_i = R_i - 1/(n_g - 1) * sum_{j in g, j != i} R_j
                                     = n_g/(n_g - 1) * (R_i - mean_g R)
    leave_none_out (LNO, GRPO)   A_i = R_i - mean_g R
    rft (expert iteration)       A_i = 1 if R_i = 1 (every unit test passes) else 0
    normalize_std (RwNorm, GRPO) A_i /= max(std_g R, 1e-6)       (std with ddof 0)
    a group of one rollout has no baseline: A_i = 0

The filter keeps rollout i iff |A_i| >= adv_min_abs (0.01), and A_i > 0 too with
adv_positive_only; the rest carry no signal. The batch planner drops them, the loss weights them
0, and the metric adv/filtered_share counts them: all three call `keep_mask`.

The clipped surrogate, with r_t = exp(logp_new_t - logp_old_t) over the generated tokens a(x_b):

    token       term_b = 1/|a(x_b)|  * sum_{t in a(x_b)} min(r_t A_b, clip(r_t) A_b)
    turn        term_b = 1/|turns_b| * sum_{turns j}     min(r_j A_b, clip(r_j) A_b),
                r_j = prod_{t in turn j} r_t
    trajectory  term_b = min(r A_b, clip(r) A_b),        r = prod_{t in a(x_b)} r_t
    loss        L = -(1/M) * sum_{kept b} term_b         M = minibatch_size, FIXED: not the number
                                                          of rollouts kept after filtering
    clip        "reference" [1/(1+eps), 1+eps] (LOOP code) | "paper" [1-eps, 1+eps] | None (RLOO)

Guards (the reference code's): KL estimate kl_k1 = -mean_b log w_b (log w_b = sum_t log r_t) over
the minibatch; |kl_k1| > kl_stop (20) ends the iteration's remaining steps (`kl_stop`). A
non-finite loss or gradient skips the step; optionally so does a gradient norm more than
`sigma` standard deviations above the running mean of accepted norms (`step_guard`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopjax.config import BASELINES, CLIP_FORMS, LEVELS

# --------------------------------------------------------------------------- advantages


def advantages(rewards, baseline: str = "leave_one_out", normalize_std: bool = False, *,
               group_ids_N=None, std_eps: float = 1e-6):
    """Advantage of every rollout against the other rollouts of its group (module docstring).

    Two forms, one computation (segment sums over groups, no loop over tasks):
      advantages(rewards_GxK, ...) -> adv_GxK: G tasks x K >= 2 rollouts each.
      advantages(rewards_N, ..., group_ids_N=ids) -> adv_N: ragged groups given by any int ids
        (rollouts cut as stragglers or lost to environment failures leave groups of 1 or more).
    Returns float32.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r} must be one of {BASELINES}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_ids_N is None:
        if rewards.ndim != 2:
            raise ValueError(
                f"rewards must be [G tasks, K rollouts], got shape {rewards.shape}; reshape a flat "
                "reward list to (num_tasks, rollouts_per_task) or pass group_ids_N")
        G, K = rewards.shape
        if K < 2:
            raise ValueError(f"advantages need K >= 2 rollouts per task to form a baseline, got "
                             f"K={K}; raise rollouts_per_task")
        seg_N = jnp.repeat(jnp.arange(G), K)
        return _grouped(rewards.reshape(-1), seg_N, G, baseline, normalize_std,
                        std_eps).reshape(G, K)
    group_ids_N = jnp.asarray(group_ids_N)
    if rewards.ndim != 1 or group_ids_N.shape != rewards.shape:
        raise ValueError(f"ragged rewards_N {rewards.shape} and group_ids_N {group_ids_N.shape} "
                         "must both be flat and of the same length")
    N = rewards.shape[0]
    if N == 0:
        return rewards
    # Any ids (task indices, with gaps) -> 0..N-1, with a static segment count: jit-safe.
    _, seg_N = jnp.unique(group_ids_N, return_inverse=True, size=N)
    return _grouped(rewards, seg_N.reshape(N), N, baseline, normalize_std, std_eps)


def _grouped(rewards_N, seg_N, num_segments, baseline, normalize_std, std_eps):
    def group_sum(x_N):  # each rollout gets the sum of x over its group
        return jax.ops.segment_sum(x_N, seg_N, num_segments=num_segments)[seg_N]

    n_N = group_sum(jnp.ones_like(rewards_N))
    if baseline == "rft":
        adv_N = (rewards_N >= 1.0).astype(jnp.float32)
    else:
        mean_N = group_sum(rewards_N) / n_N
        adv_N = rewards_N - mean_N
        if baseline == "leave_one_out":
            adv_N = adv_N * (n_N / jnp.maximum(n_N - 1, 1))
        if normalize_std:
            std_N = jnp.sqrt(group_sum(jnp.square(rewards_N - mean_N)) / n_N)
            adv_N = adv_N / jnp.maximum(std_N, std_eps)
    return jnp.where(n_N >= 2, adv_N, 0.0)


def keep_mask(adv_B, min_abs: float = 0.01, positive_only: bool = False):
    """True for rollouts that carry signal: |A| >= min_abs (and A > 0 when positive_only).

    Plain operators, so a NumPy array stays on the host (the batch planner, the train metrics) and
    a jax array stays on the device (the loss, which folds the mask into its row weights so that a
    batch keeps its static shape).
    """
    keep_B = abs(adv_B) >= min_abs
    if positive_only:
        keep_B = keep_B & (adv_B > 0)
    return keep_B


# --------------------------------------------------------------------------- clipped surrogate


def clip_range(clip_eps: float, clip_form):
    """(low, high) bounds of the importance ratio; None when the surrogate is unclipped."""
    if clip_form not in CLIP_FORMS:
        raise ValueError(f"clip_form {clip_form!r} must be one of {CLIP_FORMS}")
    if clip_form is None:
        return None
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if clip_form == "reference":
        return 1.0 / (1.0 + clip_eps), 1.0 + clip_eps
    return 1.0 - clip_eps, 1.0 + clip_eps


def _surrogate(log_ratio, adv, bounds):
    """min(r * A, clip(r) * A) and whether r lies outside the clip range, elementwise."""
    ratio = jnp.exp(log_ratio)
    if bounds is None:
        return ratio * adv, jnp.zeros(ratio.shape, bool)
    low, high = bounds
    surr = jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
    return surr, (ratio < low) | (ratio > high)


def _safe_div(num, den):
    # den == 0 means "nothing to average": the result is exactly 0, and so is its gradient.
    return num / jnp.maximum(den, 1)


SUM_KEYS = ("num_clipped", "num_units", "log_w_sum", "k3_sum", "num_tokens", "num_rollouts")


def loss_metrics(sums) -> dict:
    """clip_fraction, kl_k1 and kl_k3 from `policy_loss`'s raw sums (SUM_KEYS), which add up
    across the microbatches of a step."""
    return dict(clip_fraction=_safe_div(sums["num_clipped"], sums["num_units"]),
                kl_k1=-_safe_div(sums["log_w_sum"], sums["num_rollouts"]),
                kl_k3=_safe_div(sums["k3_sum"], sums["num_tokens"]))


def policy_loss(logp_new_BxT, logp_old_BxT, adv_B, mask_BxT, *, level: str = "token",
                clip_eps: float = 0.1, clip_form="reference", turn_ids_BxT=None,
                loss_denominator=None):
    """The clipped surrogate L of the module docstring (and RLOO/GRPO's, as switches).

    A rollout with no generated tokens (a padding row) contributes exactly 0.

    Args:
      logp_new_BxT: log-probs of the tokens under the policy being trained (differentiated).
      logp_old_BxT: behaviour log-probs; only generated positions are read.
      adv_B: advantage per rollout.
      mask_BxT: True (or 1.0) on generated tokens that count; fold row weights in here.
      turn_ids_BxT: int turn index of every token, in [0, T); required for level="turn".
      loss_denominator: the fixed minibatch size M (default B).
    Returns:
      (loss, aux): aux holds the raw sums SUM_KEYS, the `loss_metrics` made from them
      (clip_fraction, kl_k1, kl_k3 = mean_t(r_t - 1 - log r_t)), and per rollout log_w_B,
      num_tokens_B, term_B.
    """
    if level not in LEVELS:
        raise ValueError(f"level {level!r} must be one of {LEVELS}")
    bounds = clip_range(clip_eps, clip_form)
    if logp_new_BxT.shape != logp_old_BxT.shape or logp_new_BxT.shape != mask_BxT.shape:
        raise ValueError(
            f"logp_new {logp_new_BxT.shape}, logp_old {logp_old_BxT.shape} and mask "
            f"{mask_BxT.shape} must all be [B, T]")
    B, T = logp_new_BxT.shape
    if adv_B.shape != (B,):
        raise ValueError(f"adv must be [B]={B}, got {adv_B.shape}")
    if level == "turn" and turn_ids_BxT is None:
        raise ValueError("level='turn' needs turn_ids_BxT (the turn index of every token)")
    denom = B if loss_denominator is None else loss_denominator

    mask_BxT = mask_BxT.astype(jnp.float32)
    adv_B = adv_B.astype(jnp.float32)
    # --- per-token log ratios; masked positions are 0 so garbage log-probs there never leak.
    log_ratio_BxT = jnp.where(
        mask_BxT > 0, logp_new_BxT.astype(jnp.float32) - logp_old_BxT.astype(jnp.float32), 0.0)
    num_tokens_B = jnp.sum(mask_BxT, axis=1)
    log_w_B = jnp.sum(log_ratio_BxT * mask_BxT, axis=1)
    has_tokens_B = num_tokens_B > 0

    # --- surrogate per unit (token / turn / trajectory), averaged to one term per rollout.
    if level == "token":
        surr_BxT, clipped_BxT = _surrogate(log_ratio_BxT, adv_B[:, None], bounds)
        term_B = _safe_div(jnp.sum(surr_BxT * mask_BxT, axis=1), num_tokens_B)
        num_clipped = jnp.sum(clipped_BxT * mask_BxT)
        num_units = jnp.sum(num_tokens_B)
    elif level == "turn":
        turn_ids_BxT = jnp.asarray(turn_ids_BxT, jnp.int32)
        turn_sum = jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=T))
        log_ratio_BxJ = turn_sum(log_ratio_BxT * mask_BxT, turn_ids_BxT)
        turn_present_BxJ = (turn_sum(mask_BxT, turn_ids_BxT) > 0).astype(jnp.float32)
        surr_BxJ, clipped_BxJ = _surrogate(log_ratio_BxJ, adv_B[:, None], bounds)
        num_turns_B = jnp.sum(turn_present_BxJ, axis=1)
        term_B = _safe_div(jnp.sum(surr_BxJ * turn_present_BxJ, axis=1), num_turns_B)
        num_clipped = jnp.sum(clipped_BxJ * turn_present_BxJ)
        num_units = jnp.sum(num_turns_B)
    else:
        surr_B, clipped_B = _surrogate(log_w_B, adv_B, bounds)
        term_B = jnp.where(has_tokens_B, surr_B, 0.0)
        num_clipped = jnp.sum(clipped_B & has_tokens_B)
        num_units = jnp.sum(has_tokens_B)
    # --- the fixed denominator M: filtered and empty slots still count.
    loss = -jnp.sum(term_B) / denom

    # --- diagnostics (no gradient): clip fraction and KL(old || new) estimates.
    log_ratio_BxT = jax.lax.stop_gradient(log_ratio_BxT)
    sg_log_w_B = jax.lax.stop_gradient(log_w_B)
    sums = dict(num_clipped=jnp.asarray(num_clipped, jnp.float32),
                num_units=jnp.asarray(num_units, jnp.float32),
                log_w_sum=jnp.sum(sg_log_w_B),
                k3_sum=jnp.sum((jnp.exp(log_ratio_BxT) - 1.0 - log_ratio_BxT) * mask_BxT),
                num_tokens=jnp.sum(num_tokens_B),
                num_rollouts=jnp.sum(has_tokens_B).astype(jnp.float32))
    aux = dict(sums, **loss_metrics(sums), log_w_B=sg_log_w_B, num_tokens_B=num_tokens_B,
               term_B=jax.lax.stop_gradient(term_B))
    return loss, aux


# --------------------------------------------------------------------------- guards


def step_guard(loss, grad_norm, count, mean, m2, *, skip_outliers: bool, sigma: float,
               warmup: int):
    """(apply, finite, outlier) for one optimizer step, and the Welford statistics (count, mean,
    m2) of accepted gradient norms after it. A non-finite loss or gradient is skipped; with
    skip_outliers, so is a norm above mean + sigma * std once `warmup` steps were accepted."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    std = jnp.sqrt(m2 / jnp.maximum(count - 1, 1))
    outlier = skip_outliers & (count >= warmup) & (grad_norm > mean + sigma * std)
    apply = finite & ~outlier
    new_count = count + 1
    delta = grad_norm - mean
    new_mean = mean + delta / new_count
    new_m2 = m2 + delta * (grad_norm - new_mean)
    stats = tuple(jnp.where(apply, new, old)
                  for new, old in ((new_count, count), (new_mean, mean), (new_m2, m2)))
    return (apply, finite, outlier), stats


def kl_stop(kl_k1: float, limit: float) -> bool:
    """Whether a step's KL estimate ends the iteration: the policy moved too far from the one
    that sampled the rollouts (the reference code stops at |KL| > 20)."""
    return abs(kl_k1) > limit

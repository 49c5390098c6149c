"""The LOOP clipped surrogate at token, turn and trajectory level, as one pure function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = ("token", "turn", "trajectory")
CLIP_FORMS = ("reference", "paper", None)


def clip_range(clip_eps: float, clip_form):
    """(low, high) bounds of the importance ratio; None when the surrogate is unclipped.

    "reference" is the LOOP reference code's [1/(1+eps), 1+eps]; "paper" is [1-eps, 1+eps].
    """
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


def policy_loss(logp_new_BxT, logp_old_BxT, adv_B, mask_BxT, *, level: str = "token",
                clip_eps: float = 0.1, clip_form="reference", turn_ids_BxT=None,
                loss_denominator=None):
    """Clipped policy-gradient surrogate of LOOP (and of PPO/RLOO/GRPO as switches).

        r_t = exp(logp_new_t - logp_old_t) over generated tokens t (mask_BxT True)
        term_b = token:      1/|a(x_b)|  * sum_{t in a(x_b)}  min(r_t A_b, clip(r_t) A_b)
                 turn:       1/|turns_b| * sum_{turns j}       min(r_j A_b, clip(r_j) A_b),
                             r_j = prod_{t in turn j} r_t
                 trajectory: min(r A_b, clip(r) A_b),          r = prod_{t in a(x_b)} r_t
        loss = -(sum_b term_b) / loss_denominator      (default denominator: B)

    A rollout with no generated tokens (a padding row) contributes exactly 0. clip_form None drops
    the clip (REINFORCE with the given advantage: RLOO when on-policy).

    Args:
      logp_new_BxT: log-probs of the tokens under the policy being trained (differentiated).
      logp_old_BxT: behaviour log-probs; only generated positions are read.
      adv_B: advantage per rollout.
      mask_BxT: True (or 1.0) on generated tokens that count; fold row weights in here.
      turn_ids_BxT: int turn index of every token, in [0, T); required for level="turn".
      loss_denominator: the fixed minibatch size M (LOOP divides by M, not by the rollouts kept).
    Returns:
      (loss, aux): aux holds clip_fraction, kl_k1 = -mean_b(log w_b), kl_k3 = mean_t(r_t - 1 - log r_t),
      log_w_B (per-rollout log importance weight), num_tokens_B, term_B, and the raw sums
      num_clipped, num_units, k3_sum, num_tokens, num_rollouts, that add up across microbatches.
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
    loss = -jnp.sum(term_B) / denom

    # --- diagnostics (no gradient): clip fraction and KL(old || new) estimates.
    log_ratio_BxT = jax.lax.stop_gradient(log_ratio_BxT)
    k3_sum = jnp.sum((jnp.exp(log_ratio_BxT) - 1.0 - log_ratio_BxT) * mask_BxT)
    num_rollouts = jnp.sum(has_tokens_B)
    sg_log_w_B = jax.lax.stop_gradient(log_w_B)
    num_clipped = jnp.asarray(num_clipped, jnp.float32)
    num_units = jnp.asarray(num_units, jnp.float32)
    aux = dict(
        clip_fraction=_safe_div(num_clipped, num_units),
        kl_k1=-_safe_div(jnp.sum(sg_log_w_B), num_rollouts),
        kl_k3=_safe_div(k3_sum, jnp.sum(num_tokens_B)),
        log_w_B=sg_log_w_B,
        num_tokens_B=num_tokens_B,
        term_B=jax.lax.stop_gradient(term_B),
        num_clipped=num_clipped,
        num_units=num_units,
        k3_sum=k3_sum,
        num_tokens=jnp.sum(num_tokens_B),
        num_rollouts=num_rollouts.astype(jnp.float32),
    )
    return loss, aux

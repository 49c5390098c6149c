"""Per-rollout advantages from grouped rewards, and the |A| filter that drops signal-free rollouts.

Rewards come as `rewards_GxK`: G tasks, K rollouts of each, partial credit in [0, 1] (the share of
a task's unit tests that pass). Every generated token of rollout k gets its rollout's advantage.
"""

from __future__ import annotations

import jax.numpy as jnp

BASELINES = ("leave_one_out", "leave_none_out", "rft")


def advantages(rewards_GxK, baseline: str = "leave_one_out", normalize_std: bool = False,
               std_eps: float = 1e-6):
    """Advantage of every rollout against the other rollouts of its task.

    leave_one_out (LOOP, RLOO):  A_k = R_k - 1/(K-1) * sum_{i != k} R_i  =  K/(K-1) * (R_k - mean(R))
    leave_none_out (LNO, GRPO):  A_k = R_k - mean(R)
    rft (expert iteration):      A_k = 1 if R_k = 1 (all of the task's tests pass) else 0: with
                                 the |A| filter, fine-tuning on the policy's own successes only.
    normalize_std:               A_k /= max(std(R), std_eps), std over the task's K rewards (ddof=0).
                                 GRPO = leave_none_out + normalize_std; LOOP RwNorm = leave_one_out +
                                 normalize_std. A task whose rewards are all equal gets A = 0 exactly.

    Args:
      rewards_GxK: float rewards, G tasks x K >= 2 rollouts each.
    Returns:
      adv_GxK, float32.
    """
    rewards_GxK = jnp.asarray(rewards_GxK, jnp.float32)
    if rewards_GxK.ndim != 2:
        raise ValueError(
            f"rewards must be [G tasks, K rollouts], got shape {rewards_GxK.shape}; "
            "reshape a flat reward list to (num_tasks, rollouts_per_task)")
    K = rewards_GxK.shape[1]
    if K < 2:
        raise ValueError(
            f"advantages need K >= 2 rollouts per task to form a baseline, got K={K}; "
            "raise rollouts_per_task")
    if baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r} must be one of {BASELINES}")
    if baseline == "rft":
        return (rewards_GxK >= 1.0).astype(jnp.float32)
    mean_Gx1 = jnp.mean(rewards_GxK, axis=1, keepdims=True)
    adv_GxK = rewards_GxK - mean_Gx1
    if baseline == "leave_one_out":
        adv_GxK = adv_GxK * (K / (K - 1))
    if normalize_std:
        std_Gx1 = jnp.std(rewards_GxK, axis=1, keepdims=True)
        adv_GxK = adv_GxK / jnp.maximum(std_Gx1, std_eps)
    return adv_GxK


def keep_mask(adv_B, min_abs: float = 0.01, positive_only: bool = False):
    """True for rollouts that carry signal: |A| >= min_abs (and A > 0 when positive_only).

    Rollouts with |A| < min_abs (e.g. every rollout of a task whose rewards are all equal) add no
    gradient but cost a forward/backward; the epoch driver drops them on the host, and the update
    step multiplies this mask into its row weights so that a batch keeps its static shape.
    """
    adv_B = jnp.asarray(adv_B)
    keep_B = jnp.abs(adv_B) >= min_abs
    if positive_only:
        keep_B = keep_B & (adv_B > 0)
    return keep_B

"""Typed values the collection hands on besides its Rollouts: what a collection cost
(`CollectionSummary`) and an episode the trajectory viewer shows (`ShownEpisode`).

    rollouts, summary = collect(...)                   # each Rollout carries its EpisodeRecord
    shown = ShownEpisode(rollouts[0].episode, "dev", "after LOOP", 10)

A stage that adds to a record makes a new value around it: the records themselves are frozen.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from loopjax.envs.base import EpisodeRecord


@dataclasses.dataclass(frozen=True)
class CollectionSummary:
    """One collection's costs on this host (or, merged, on all of them)."""

    generate_s: float  # seconds in the sampler's device steps
    env_wait_s: float  # seconds waiting for environments
    device_steps: int  # sampler calls
    cut: int  # episodes dropped as stragglers
    prefill_tokens: int  # prompt tokens computed
    prefill_shared_tokens: int  # prompt tokens mapped from the prefix cache instead
    kv_peak_bytes: int  # bytes of the KV-cache pages held at most

    @staticmethod
    def merged(parts: Sequence[CollectionSummary]) -> CollectionSummary:
        """The hosts' summaries as one: episodes cut and tokens add up; the hosts collect at the
        same time, so the slowest one's times (and the largest peak) count."""
        def add_or_max(field: dataclasses.Field):
            adds = field.name == "cut" or field.name.endswith("tokens")
            return (sum if adds else max)(getattr(p, field.name) for p in parts)
        return CollectionSummary(*map(add_or_max, dataclasses.fields(CollectionSummary)))


@dataclasses.dataclass(frozen=True)
class ShownEpisode:
    """An episode for trajectories.html, with where it came from."""

    episode: EpisodeRecord
    split: str  # the task split it ran on
    tag: str  # "before LOOP", "after LOOP", "during" or "train"
    iteration: int  # the LOOP iteration of the policy that ran it

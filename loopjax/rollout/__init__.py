"""Rollouts: the collector (many episodes at once on the sampler), the packed learner batch, and
the typed records a collection hands on.

    from loopjax.rollout import Rollout, Batch, collect, pack_minibatch
"""

from loopjax.envs.base import EpisodeRecord, Turn
from loopjax.rollout.batch import Batch, Rollout, pack_demonstrations, pack_minibatch
from loopjax.rollout.collector import Episode, EpisodeLimits, collect, start_episode, step_episode
from loopjax.rollout.records import CollectionSummary, ShownEpisode

__all__ = ["Batch", "CollectionSummary", "Episode", "EpisodeLimits", "EpisodeRecord", "Rollout",
           "ShownEpisode", "Turn", "collect", "pack_demonstrations", "pack_minibatch",
           "start_episode", "step_episode"]

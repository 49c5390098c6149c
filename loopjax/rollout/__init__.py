"""Rollouts: the collector (many episodes at once on the sampler) and the packed learner batch.

    from loopjax.rollout import Rollout, Batch, collect, pack_minibatch
"""

from loopjax.rollout.batch import Batch, Rollout, pack_demonstrations, pack_minibatch
from loopjax.rollout.collector import Episode, EpisodeLimits, collect, start_episode, step_episode

__all__ = ["Batch", "Rollout", "pack_demonstrations", "pack_minibatch", "Episode", "EpisodeLimits",
           "collect", "start_episode", "step_episode"]

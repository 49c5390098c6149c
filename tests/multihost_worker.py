"""One JAX process of tests/test_multihost.py: the main job (experiments.appworld_loop), with two
test-only additions.

- A reward computed from the sampled tokens. A tiny from-scratch policy scores the same on every
  miniworld task, which would leave every advantage 0 and nothing to train; this reward differs
  between rollouts and is a pure function of a rollout, so it is the same however the episodes
  are spread over processes.
- A check of every host-local view the sampler gets (multihost.local_view): only this host's
  devices, each shard at the same index as in the global array and in the same buffer (no copy).

Run as `python tests/multihost_worker.py JOB_OPTIONS`; the environment says which process it is.
"""

import atexit
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Before the imports below, one of which would otherwise configure logging at WARNING level.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                    datefmt="%H:%M:%S")

import jax  # noqa: E402

from loopjax import multihost, train  # noqa: E402

_collect, _local_view = train.collect, multihost.local_view
views_checked = [0]


def collect_token_reward(*args, **kwargs):
    records, stats = _collect(*args, **kwargs)
    for r in records:
        out = r.tokens[r.is_output]
        r.reward = float(np.mean(out % 4 == 0)) if out.size else 0.0
    return records, stats


def checked_local_view(tree, mesh_local):
    view = _local_view(tree, mesh_local)
    for x, v in zip(jax.tree.leaves(tree), jax.tree.leaves(view), strict=True):
        assert v.sharding.device_set == set(jax.local_devices()), v.sharding
        index, buffer = x.sharding.devices_indices_map(x.shape), {
            s.device: s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
        for s in v.addressable_shards:
            assert s.index == index[s.device], (s.index, index[s.device])
            assert s.data.unsafe_buffer_pointer() == buffer[s.device], "local_view copied a shard"
    views_checked[0] += 1
    return view


train.collect = collect_token_reward
multihost.local_view = checked_local_view
atexit.register(lambda: print(f"local views checked: {views_checked[0]}", flush=True))

if __name__ == "__main__":
    from experiments import appworld_loop  # noqa: E402

    appworld_loop.main(sys.argv[1:])

"""Test session set-up: 8 fake CPU devices so that every sharded path runs in every session.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""
import os
import tempfile

# One persistent XLA compilation cache for every process of a test session: both xdist workers
# and the main-job subprocesses (test_train runs the job six times, test_multihost three) compile
# the same programs, which then compile once. JAX keys entries on the program and its options, so
# a hit is the executable a compile would give. A size limit turns on JAX's file lock, which
# keeps processes that write the cache at the same time safe. Traces (what the compile-count
# tests count) are not cached.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"loopjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# A collective on the fake devices waits for all 8 device threads; XLA:CPU aborts the process when
# one is 40 s late (its default). Two test processes share the 2-core CI machine while others
# compile, so a thread can be late under load alone (the likeliest reading of a CI abort that did
# not reproduce here): allow 10 minutes. A real deadlock still ends, and pytest-timeout prints
# every thread's stack first.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def as_rollout(tokens, is_output, logp, turn_id, *, reward=0.0, group=0, task_id="task"):
    """A loopjax Rollout from token arrays (tests that need no episode around them)."""
    import numpy as np  # noqa: PLC0415
    from loopjax.rollout import Rollout  # noqa: PLC0415
    return Rollout(tokens=np.asarray(tokens, np.int32), is_output=np.asarray(is_output, bool),
                   logp=np.asarray(logp, np.float32), turn_id=np.asarray(turn_id, np.int32),
                   reward=float(reward), success=reward == 1.0, task_id=task_id, group=group)

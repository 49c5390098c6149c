"""Test set-up: 8 fake CPU devices so that every sharded path runs in every pytest run.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""
import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache for every process of one pytest run: both xdist workers
# and the main-job subprocesses (test_train runs the job six times on one CPU device) compile the
# same programs, which then compile once. JAX keys entries on the program and its options, so a
# hit is the executable a compile would give. A size limit turns on JAX's file lock, which keeps
# processes that write the cache at the same time safe. Traces (what the compile-count tests
# count) are not cached. Programs over several CPU devices are never cached: see
# `_cache_single_device_programs_only` below. The cache is the run's own (made here by the
# pytest process, inherited by its workers and subprocesses, removed at its exit): a cache kept
# across runs held entries of killed runs, and a single-device program read back from it
# aborted the process (test_collector, 2026-12-07, b3747ff and 5fb604a).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="loopjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# A collective on the fake devices waits for all 8 device threads; XLA:CPU aborts the process when
# one is late by its termination timeout (40 s by default). Give a loaded 2-core machine 2 minutes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=120"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
from jax._src import compiler as _compiler  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _cache_single_device_programs_only():
    """Programs over several CPU devices compile afresh instead of being read from the cache.

    XLA:CPU runs a program's thunks in dataflow order, and its thunk emitter gives all collectives
    one shared resource so that every device meets them in one order. An executable read back
    from the persistent cache (jaxlib 0.10.2) does not keep that order: the 2x2x2 update step of
    test_update_gradient, read back from the cache, hung in 7 runs out of 8 with devices waiting
    in different collectives (an all-reduce inside the layer loop against one outside it), and in
    none of 16 runs compiled afresh. That hang, ended by XLA after its collective timeout, was CI's
    SIGABRT. Single-device programs have no collectives and are still cached.
    """
    compile_or_get_cached = _compiler.compile_or_get_cached

    def compile_unless_multi_device(backend, computation, devices, compile_options,
                                    host_callbacks, executable_devices, *args, **kwargs):
        if backend.platform == "cpu" and devices.size > 1:
            return _compiler.backend_compile_and_load(backend, computation, executable_devices,
                                                      compile_options, host_callbacks)
        return compile_or_get_cached(backend, computation, devices, compile_options,
                                     host_callbacks, executable_devices, *args, **kwargs)

    _compiler.compile_or_get_cached = compile_unless_multi_device


_cache_single_device_programs_only()


def as_rollout(tokens, is_output, logp, turn_id, *, reward=0.0, group=0, task_id="task"):
    """A loopjax Rollout from token arrays (tests that need no episode around them)."""
    import numpy as np  # noqa: PLC0415

    from loopjax.rollout import Rollout  # noqa: PLC0415
    return Rollout(tokens=np.asarray(tokens, np.int32), is_output=np.asarray(is_output, bool),
                   logp=np.asarray(logp, np.float32), turn_id=np.asarray(turn_id, np.int32),
                   reward=float(reward), success=reward == 1.0, task_id=task_id, group=group)

"""The C allocator a benchmark runs under, the same for loopjax and its peer.

On CPU both XLA and PyTorch take their large buffers (XLA: each execution's temporaries; torch:
activations and gradients) from malloc. glibc serves allocations above 32 MB with a fresh mmap
and returns them on free, so every step faults each page of them in again: 400K-570K page
faults per update step for loopjax and 0.4-0.9M for the peer at the default update_step config
(docs/performance.md, "The allocator, and SwiGLU's residuals"). tcmalloc keeps freed memory
mapped. `--allocator
tcmalloc` runs both sides under it (LD_PRELOAD); the default, `system`, is what a plain
`python` gets.

    apt-get install libtcmalloc-minimal4   # Debian / Ubuntu
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

CHOICES = ("system", "tcmalloc")
_REEXEC = "LOOPJAX_BENCHMARK_REEXEC_ALLOCATOR"  # set in a re-executed process: never twice


def tcmalloc_path() -> str:
    """The tcmalloc shared library on this machine; a clear error where there is none."""
    for pattern in ("/usr/lib/*/libtcmalloc_minimal.so*", "/usr/lib/*/libtcmalloc.so*",
                    "/usr/lib64/libtcmalloc*.so*"):
        paths = sorted(glob.glob(pattern))
        if paths:
            return paths[0]
    # Elsewhere, a soname the dynamic loader resolves (find_library gives no path on Linux).
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if found:
        return found
    raise SystemExit("--allocator tcmalloc: no libtcmalloc on this machine "
                     "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")


def env_for(allocator: str, env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) that starts a process under `allocator`."""
    env = dict(os.environ if env is None else env)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "tcmalloc" not in p]
    if allocator == "tcmalloc":
        preload.insert(0, tcmalloc_path())
    elif allocator != "system":
        raise ValueError(f"allocator must be one of {CHOICES}, got {allocator!r}")
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def current() -> str:
    """The allocator this process actually runs under, read from its memory map."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "tcmalloc" in f.read() else "system"
    except OSError:
        return "unknown"


def ensure(allocator: str, argv: list[str]) -> None:
    """Re-executes this process (`argv`, with the same interpreter) under `allocator` unless it
    already runs under it; for a benchmark whose sides share one process. Exits with a message
    where the allocator cannot be checked or the re-executed process still lacks it."""
    now = current()
    if now == allocator:
        return
    if now == "unknown":
        raise SystemExit(f"--allocator {allocator}: cannot read /proc/self/maps to check it")
    if os.environ.get(_REEXEC) == allocator:
        raise SystemExit(f"--allocator {allocator}: re-executed with LD_PRELOAD="
                         f"{os.environ.get('LD_PRELOAD', '')!r} but this process runs under {now}")
    env = env_for(allocator)
    env[_REEXEC] = allocator
    os.execve(sys.executable, [sys.executable] + argv, env)

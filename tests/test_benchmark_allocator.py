"""benchmarks/allocator.py: both benchmark sides start under the allocator asked for, or the
benchmark says why it cannot."""

import importlib.util
import os
import subprocess
import sys

import pytest

# Loaded from its file: the benchmarks folder is not put on sys.path (its env.py, sampler.py ...
# would shadow other modules for the rest of the session).
_spec = importlib.util.spec_from_file_location("benchmark_allocator", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "allocator.py"))
allocator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(allocator)

FAKE_TCMALLOC = "/opt/fake/libtcmalloc_minimal.so.4"


def test_env_for_sets_and_clears_the_preload(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: FAKE_TCMALLOC)
    base = {"LD_PRELOAD": "/opt/other/libfoo.so:/usr/lib/x/libtcmalloc.so.4", "KEEP": "1"}
    env = allocator.env_for("tcmalloc", base)
    assert env["LD_PRELOAD"] == f"{FAKE_TCMALLOC}:/opt/other/libfoo.so"  # one tcmalloc, first
    assert env["KEEP"] == "1" and base["LD_PRELOAD"].startswith("/opt/other")  # a copy
    assert allocator.env_for("system", base)["LD_PRELOAD"] == "/opt/other/libfoo.so"
    assert "LD_PRELOAD" not in allocator.env_for("system", {"LD_PRELOAD": FAKE_TCMALLOC})
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.env_for("jemalloc", base)


def test_missing_tcmalloc_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(allocator.glob, "glob", lambda pattern: [])
    with pytest.raises(SystemExit, match="apt-get install libtcmalloc-minimal4"):
        allocator.tcmalloc_path()


def test_ensure_never_loops(monkeypatch):
    """A re-executed process that still lacks the allocator exits with a message (no exec)."""
    monkeypatch.setattr(allocator, "current", lambda: "system")
    monkeypatch.setenv(allocator._REEXEC, "tcmalloc")
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed again"))
    with pytest.raises(SystemExit, match="but this process runs under system"):
        allocator.ensure("tcmalloc", ["bench.py"])
    allocator.ensure("system", ["bench.py"])  # already under it: returns


def test_current_reads_this_process_map():
    """`current()` names what the process really loaded: a child started with env_for("system")
    reports system (and, where this machine has tcmalloc, one started with it reports tcmalloc)."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(allocator.__file__)!r}); " \
           "import allocator; print(allocator.current())"
    out = subprocess.run([sys.executable, "-c", code], env=allocator.env_for("system"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "system"
    try:
        env = allocator.env_for("tcmalloc")
    except SystemExit:
        return  # no tcmalloc here: the message is covered above
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "tcmalloc"

"""Defense in depth: even code that got past the Python-level restrictions (imports, builtins,
AST check) meets the worker's OS limits. The probe runs the worker's `lock_down` and then, with
full Python, tries to fork, write files, open sockets, run programs and allocate memory."""
import json
import os
import subprocess
import sys
import tempfile

from loopjax.envs.sandbox import WORKER

PROBE = r"""
import importlib.util, json, os, socket, subprocess, sys
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
channel = worker.lock_down({"memory_mb": 256, "cpu_total_s": 30})
results = {}

def attempt(name, fn):
    try:
        fn()
        results[name] = "allowed"
    except BaseException as e:
        results[name] = type(e).__name__

def fork():
    if os.fork() == 0:
        os._exit(0)

attempt("fork", fork)
attempt("write_file", lambda: open(sys.argv[2], "w").write("x"))
attempt("read_canary", lambda: open(sys.argv[3]).read())
attempt("socket", lambda: socket.socket())
attempt("subprocess", lambda: subprocess.run(["/bin/true"]))
attempt("memory", lambda: bytearray(512 * 2 ** 20))
attempt("kill_parent", lambda: os.kill(int(sys.argv[4]), 0))
os.write(channel.wfd, json.dumps(results).encode())
"""


def test_os_limits_hold_without_python_restrictions():
    tmp = tempfile.mkdtemp(prefix="loopjax-oslimits-")
    os.chmod(tmp, 0o777)
    target = os.path.join(tmp, "written.txt")
    canary = os.path.join(tmp, "canary.txt")
    with open(canary, "w") as f:
        f.write("secret")
    os.chmod(canary, 0o600)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, WORKER, target, canary,
                          str(os.getpid())], capture_output=True, timeout=60)
    results = json.loads(out.stdout)
    for name in ("fork", "write_file", "socket", "subprocess", "memory"):
        assert results[name] != "allowed", (name, results)
    if os.getuid() == 0:  # dropped to nobody: root's files and processes are out of reach
        assert results["read_canary"] != "allowed" and results["kill_parent"] != "allowed"
    assert not os.path.exists(target)

"""Hostile agent code: each snippet ends with an error observation within the limit, the trainer
survives, nothing on the host changes, and evaluate() cannot be made to pass."""
import os
import tempfile
import time

import pytest

from loopjax.envs import make_env
from loopjax.envs.sandbox import CellResult, Sandbox, SandboxLimits

LIMIT_S = 2.0
TASK = "text_contact.train.0"

HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "swallowing_loop": "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "memory_bomb": "x = [0] * (10 ** 10)",
    "string_memory_bomb": "x = 'a' * (10 ** 10)",
    "read_passwd": "print(open('/etc/passwd').read())",
    "write_file": "open('/tmp/pwned', 'w').write('x')",
    "socket": "import socket\nsocket.socket().connect(('example.com', 80))",
    "os_system": "import os\nos.system('touch /tmp/pwned')",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '/tmp/pwned'])",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'touch /tmp/pwned')",
    "sys_exit": "import sys\nsys.exit(0)",
    "raise_system_exit": "raise SystemExit(0)",
    "exit_builtin": "exit()",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "dunder_import": "__import__('os').system('touch /tmp/pwned')",
    "builtins_dict": "__builtins__['open']('/etc/passwd')",
    "subclasses": "print(().__class__.__bases__[0].__subclasses__())",
    "function_globals": "f = lambda: 0\nprint(f.__globals__)",
    "frame_walk": "def g():\n    yield 1\nx = g()\nprint(x.gi_frame.f_back)",
    "getattr_dunder": "print(getattr((), '__class__'))",
    "eval_exec": "eval(\"__import__('os')\")",
    "module_escape": "import random\nprint(random._os)",
    "module_submodule": "import re\nprint(re.enum.sys)",
    "patch_apis": "apis.supervisor.complete_task = lambda **kw: None",
    "patch_type": "type(apis).__getattr__ = None",
    "fake_done_print": "print('{\"op\": \"done\"}')\nraise RuntimeError('x')",
    "keyboard_interrupt": "raise KeyboardInterrupt",
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "threading": "import threading\nthreading.Thread(target=lambda: None).start()",
    "huge_api_argument": "apis.phone.send_text_message(to='x', message='m' * (50 * 10 ** 6))",
}


@pytest.fixture(scope="module")
def env():
    e = make_env("miniworld-tiny", time_limit_s=LIMIT_S)
    yield e
    e.close()


@pytest.fixture(scope="module")
def canary():
    d = tempfile.mkdtemp(prefix="loopjax-canary-")
    path = os.path.join(d, "canary.txt")
    with open(path, "w") as f:
        f.write("intact")
    os.chmod(d, 0o777)
    os.chmod(path, 0o666)  # even world-writable, the worker cannot touch it
    yield path


def _host_snapshot(canary):
    with open(canary) as f:
        content = f.read()
    return content, sorted(os.listdir(tempfile.gettempdir())), os.path.exists("/tmp/pwned")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_snippet_is_contained(env, canary, name):
    code = HOSTILE[name].replace("/tmp/pwned", canary)
    before = _host_snapshot(canary)
    env.reset(TASK)
    start = time.monotonic()
    res = env.step(code)
    elapsed = time.monotonic() - start
    # A hang guard, not a performance assertion: the limit (plus a restart) bounds every cell.
    assert elapsed < LIMIT_S + 20
    assert ("Error" in res.output or "Exception" in res.output or "Violation" in res.output
            or "SystemExit" in res.output or "KeyboardInterrupt" in res.output), res.output
    assert not res.done
    assert _host_snapshot(canary) == before
    assert env.step("print(6 * 7)").output == "42"  # the episode goes on
    assert not env.evaluate().success


def test_big_print_is_capped(env):
    env.reset(TASK)
    res = env.step("print('x' * (100 * 10 ** 6))")
    assert len(res.output) < 25_000 and "[output truncated" in res.output


def test_patching_cannot_fake_success(env):
    env.reset(TASK)
    env.step("apis.supervisor.complete_task(answer='whatever')")
    env2 = env.evaluate()
    assert not env2.success and env2.reward < 1.0


def test_variables_survive_a_timeout_and_calls_are_not_repeated(env):
    env.reset(TASK)
    env.step("n = len(apis.phone.search_contacts(page_limit=3))\nk = 5")
    calls = env.world.num_calls
    res = env.step("while True: pass")
    assert "TimeoutError" in res.output and "restored" in res.output
    assert env.step("print(n, k)").output == "3 5"
    assert env.world.num_calls == calls  # the replay answered from the log


def test_worker_runs_as_nobody_when_root():
    if os.getuid() != 0:
        pytest.skip("only meaningful when the tests run as root")
    box = Sandbox(SandboxLimits(time_limit_s=LIMIT_S))
    try:
        box.reset()
        res: CellResult = box.run("x = 1", lambda app, api, kw: None)
        assert res.error is None
        pid = box._worker.proc.pid
        with open(f"/proc/{pid}/status") as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        assert uid_line.split()[1] == "65534"
    finally:
        box.close()

"""The OS boundary itself: code that already escaped every Python-level restriction.

These cases run through make_env / reset / step / evaluate in the test-only worker mode without
the AST check and builtins restrictions (`python_checks=False`), so agent code has `os`, `ctypes`,
`socket` and the rest of the standard library, as after an escape. What must still hold: no file
of the host is readable (the project, /etc, home folders) or writable (a world-writable canary stays
byte-identical), nothing persists into the next episode, no program runs, no process starts, no
socket opens (a listener on 127.0.0.1 receives nothing), no other process can be signalled (a
second environment's worker keeps working), and evaluation fails.
"""
import os
import re
import socket
import threading

import pytest

from loopjax.envs import list_tasks, make_env
from loopjax.envs.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, os_sandbox_problem
from loopjax.envs.sandbox_jail import SANDBOX_UID_BASE
from test_sandbox_hostile import canary, host_snapshot  # noqa: F401  (a fixture)

LIMIT_S = 3.0
TASK = list_tasks("miniworld-tiny", "train")[0]  # any task: these cases never solve it
SOURCE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "loopjax", "envs",
                                      "miniworld", "scenario.py"))
EPERM = r"PermissionError: \[Errno 1\] Operation not permitted"
ENOENT = r"FileNotFoundError: \[Errno 2\] No such file or directory"


def libc(call):
    return ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"r = {call}\nprint(r, ctypes.get_errno())")


# (name, code, regex for the observation); {canary}, {canary_dir}, {port}, {source}, {pid} are
# filled in per run.
CASES = [
    # -- files: reading the host ---------------------------------------------------------------
    ("read_passwd", "print(open('/etc/passwd').read())", ENOENT),
    ("read_project_source", "print(open({source!r}).read())", ENOENT),
    ("read_canary", "print(open({canary!r}).read())", ENOENT),
    ("read_proc", "print(open('/proc/1/environ').read())", ENOENT),
    ("read_root_home", "import os\nprint(os.listdir('/root'))", ENOENT),
    ("list_root", "import os\nprint(sorted(os.listdir('/')))", r"^\['python'\]$"),
    ("import_loopjax", "import loopjax", r"ModuleNotFoundError: No module named 'loopjax'"),
    ("import_task_generator", "from loopjax.envs.miniworld import tasks",
     r"ModuleNotFoundError: No module named 'loopjax'"),
    ("import_site_packages", "import numpy", r"ModuleNotFoundError: No module named 'numpy'"),
    ("close_stdin_then_open", "import os\nos.close(0)\nprint(os.open('/etc/shadow', os.O_RDONLY))",
     ENOENT),
    # -- files: writing, deleting, persisting ---------------------------------------------------
    ("write_canary", "open({canary!r}, 'w').write('pwned')", EPERM),
    ("append_canary", "open({canary!r}, 'a').write('pwned')", EPERM),
    ("create_in_canary_dir", "open({canary_dir!r} + '/new', 'x')", EPERM),
    ("create_in_tmp", "open('/tmp/pwned', 'w')", EPERM),
    ("write_stdlib", "open('/python/os.py', 'r+')", EPERM),
    ("unlink_canary", "import os\nos.unlink({canary!r})", EPERM),
    ("truncate_canary", "import os\nos.truncate({canary!r}, 0)", EPERM),
    ("rename_stdlib", "import os\nos.rename('/python/os.py', '/python/x.py')", EPERM),
    ("mkdir", "import os\nos.mkdir('/python/x')", EPERM),
    ("symlink", "import os\nos.symlink('/python', '/python/loop')", EPERM),
    ("hardlink", "import os\nos.link('/python/os.py', '/python/os2.py')", EPERM),
    ("chmod_stdlib", "import os\nos.chmod('/python/os.py', 0o777)", EPERM),
    ("memfd", "import os\nos.memfd_create('x')", EPERM),
    ("mknod", "import os\nos.mknod('/python/dev', 0o600)", EPERM),
    # -- programs and processes -----------------------------------------------------------------
    ("execve_shell", "import os\nos.execv('/bin/sh', ['sh', '-c', 'id'])", EPERM),
    ("execve_python", "import os, sys\nos.execv(sys.executable, ['python'])", EPERM),
    ("subprocess", "import subprocess\nsubprocess.run(['/bin/true'])", EPERM),
    ("fork", "import os\nos.fork()", EPERM),
    ("thread", "import threading\nthreading.Thread(target=print).start()",
     r"RuntimeError: can't start new thread"),
    ("clone_ctypes", libc("libc.syscall(56, 17, 0, 0, 0, 0)"), r"^-1 1$"),
    ("setsid", "import os\nos.setsid()", EPERM),
    ("own_pid_namespace", "import os\nprint(os.getpid(), os.getppid())", r"^1 0$"),
    ("own_uid", "import os\nprint(os.getuid() >= {uid_base} or os.getuid() != 0, os.getgroups())",
     r"^True \[\]$"),
    ("setuid_root", "import os\nos.setuid(0)", EPERM),
    ("raise_rlimit_as", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
     r"ValueError: not allowed to raise maximum limit|PermissionError"),
    # -- network -------------------------------------------------------------------------------
    ("tcp_to_listener", "import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)", EPERM),
    ("udp_to_listener", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
     ".sendto(b'x', ('127.0.0.1', {port}))", EPERM),
    ("unix_socket", "import socket\nsocket.socket(socket.AF_UNIX)", EPERM),
    ("raw_socket_ctypes", libc("libc.socket(2, 1, 0)"), r"^-1 1$"),
    ("socketpair", "import socket\nsocket.socketpair()", EPERM),
    # -- signals and other processes --------------------------------------------------------------
    ("kill_all_stop", "import os, signal\nos.kill(-1, signal.SIGSTOP)", EPERM),
    ("kill_other_worker", "import os, signal\nos.kill({pid}, signal.SIGKILL)", EPERM),
    ("kill_trainer", "import os, signal\nos.kill({trainer}, signal.SIGKILL)", EPERM),
    ("pidfd_other_worker", "import os\nos.pidfd_open({pid})", EPERM),
    ("ptrace_ctypes", libc("libc.ptrace(16, {pid}, 0, 0)"), r"^-1 1$"),
    ("process_vm_readv", libc("libc.syscall(310, {pid}, 0, 0, 0, 0, 0)"), r"^-1 1$"),
    # -- namespaces, mounts and other kernel doors ------------------------------------------------
    ("unshare_ctypes", libc("libc.unshare(0x10000000)"), r"^-1 1$"),
    ("mount_ctypes", libc("libc.mount(b'none', b'/python', b'tmpfs', 0, None)"), r"^-1 1$"),
    ("chroot", "import os\nos.chroot('/python')", EPERM),
    ("setns_ctypes", libc("libc.setns(3, 0)"), r"^-1 1$"),
    ("bpf_ctypes", libc("libc.syscall(321, 0, 0, 0)"), r"^-1 1$"),
    ("io_uring_ctypes", libc("libc.syscall(425, 8, 0)"), r"^-1 1$"),
    ("keyctl_ctypes", libc("libc.syscall(250, 0, 0, 0, 0, 0)"), r"^-1 1$"),
    ("perf_event_ctypes", libc("libc.syscall(298, 0, 0, -1, -1, 0)"), r"^-1 1$"),
    ("tiocsti", "import fcntl, termios\nfcntl.ioctl(0, termios.TIOCSTI, b'x')", EPERM),
]
assert len({c[0] for c in CASES}) == len(CASES)

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="the ctypes cases use x86_64 syscall numbers")


@pytest.fixture(scope="module")
def envs():
    e = [make_env("miniworld-tiny", time_limit_s=LIMIT_S, python_checks=False) for _ in range(2)]
    yield e
    for x in e:
        x.close()


@pytest.fixture(scope="module")
def listener():
    """A TCP and a UDP listener on 127.0.0.1 that record anything they receive."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.2)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.settimeout(0.2)
    got, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            for s in (tcp, udp):
                try:
                    got.append(s.accept() if s is tcp else s.recvfrom(100))
                except (TimeoutError, OSError):
                    pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port, got
    stop.set()
    t.join()
    tcp.close()
    udp.close()


@pytest.mark.parametrize("name,code,expect", CASES, ids=[c[0] for c in CASES])
def test_os_boundary_holds(envs, canary, listener, name, code, expect):  # noqa: F811 (fixture)
    env, other = envs
    port, received = listener
    other.reset(TASK)
    assert other.step("x = 41").output == "Execution successful."
    pid = other.sandbox._worker.proc.pid
    code = code.format(canary=canary, canary_dir=os.path.dirname(canary), port=port,
                       source=SOURCE, pid=pid, trainer=os.getpid(), uid_base=SANDBOX_UID_BASE)
    before = host_snapshot(canary)
    env.reset(TASK)
    res = env.step(code)
    assert re.search(expect, res.output, re.M), (name, res.output[-800:])
    assert not res.done
    assert env.step("print(6 * 7)").output == "42"
    assert not env.evaluate().success
    assert host_snapshot(canary) == before
    assert received == []
    assert other.step("print(x + 1)").output == "42"  # the other worker was not stopped or killed


def test_nothing_persists_across_episodes(envs):
    env = envs[0]
    env.reset(TASK)
    env.step("import os, sys, json\njson.secret = 'kept'\nsys.modules['memo'] = 1\n"
             "try:\n    os.symlink('/python', '/python/mem')\nexcept OSError:\n    pass")
    env.reset(TASK)
    out = env.step("import os, sys, json\nprint(hasattr(json, 'secret'), 'memo' in sys.modules, "
                   "os.path.lexists('/python/mem'))").output
    assert out == "False False False"


def test_workers_have_distinct_uids_when_root():
    if os.getuid() != 0:
        pytest.skip("own uids need root; otherwise the worker drops every capability")
    boxes = [Sandbox(SandboxLimits(time_limit_s=LIMIT_S, python_checks=False)) for _ in range(2)]
    try:
        uids = []
        for box in boxes:
            box.reset()
            res = box.run("import os\nprint(os.getuid(), os.getgid())", lambda *a: None)
            uid, gid = map(int, res.output.split())
            assert uid == gid and uid >= SANDBOX_UID_BASE
            uids.append(uid)
        assert uids[0] != uids[1]
    finally:
        for box in boxes:
            box.close()


def test_user_namespace_path_sandboxes_too():
    """The path taken when not root (or root without CAP_SYS_ADMIN): a user namespace."""
    import dataclasses
    import json
    import struct
    import subprocess
    import sys

    from loopjax.envs.sandbox import WORKER
    limits = dict(dataclasses.asdict(SandboxLimits()), user_namespace=True, python_checks=False)
    p = subprocess.Popen([sys.executable, "-I", "-S", "-B", WORKER, json.dumps(limits)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        def recv():
            (n,) = struct.unpack(">I", p.stdout.read(4))
            return json.loads(p.stdout.read(n))
        first = recv()
        if first["op"] == "refused":
            pytest.skip(f"no user namespaces here: {first['reason']}")
        code = ("import os\nr = [sorted(os.listdir('/')), os.getpid()]\n"
                "for f in (os.fork, lambda: open('/python/x', 'w')):\n"
                "    try:\n        f()\n    except OSError as e:\n        r.append(e.errno)\n"
                "print(r)")
        body = json.dumps({"op": "exec", "code": code, "cell": 1}).encode()
        p.stdin.write(struct.pack(">I", len(body)) + body)
        p.stdin.flush()
        assert recv()["output"].strip() == "[['python'], 1, 1, 1]"
    finally:
        p.kill()
        p.wait()


def test_refuses_without_os_sandbox(monkeypatch):
    """Where the OS sandbox is unavailable, Sandbox() raises with the reason and the way out."""
    import loopjax.envs.sandbox as sb
    monkeypatch.setattr(sb, "_probe_result", {sb.sys.executable: "no user namespaces (test)"})
    monkeypatch.delenv(sb.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable,
                       match="(?s)no user namespaces.*LOOPJAX_UNSAFE_NO_OS_SANDBOX"):
        make_env("miniworld-tiny")
    box = Sandbox(SandboxLimits(unsafe_no_os_sandbox=True))  # the explicit, risk-accepting flag
    try:
        box.reset()
        assert box.run("print(1)", lambda *a: None).output == "1\n"
    finally:
        box.close()
    assert os_sandbox_problem() == "no user namespaces (test)"

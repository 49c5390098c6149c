"""AppWorld's environment server with agent code contained by the OS, evaluation apart from it.

    $APPWORLD_PYTHON appworld_jail.py --root ROOT --socket PATH

Runs in AppWorld's venv (standard library and appworld only; loopjax's `sandbox_jail.py` is
loaded by path). It answers the routes of AppWorld's own server that loopjax's adapter uses
(GET /, POST /initialize, /execute, /task_completed, /evaluate, /close) over a Unix socket, and
is made of three kinds of process:

- **this server** (trusted): imports AppWorld once, never loads a ground truth and never runs
  agent code; it forks the other two and relays between them and the trainer;
- **the episode** (untrusted), one per /initialize: it enters the OS sandbox
  (`sandbox_jail`: new mount, network, PID, IPC and UTS namespaces; a new root holding only the
  Python environment read-only, the task data read-only, a 64 MB tmpfs for AppWorld's outputs
  and a small one for HOME), builds the task's world without its ground truth
  (`load_ground_truth=False`), then unmounts the data, takes its own uid (or drops every
  capability), sets rlimits and loads the seccomp filter (execve, fork and clone, sockets,
  ptrace, signals to others, mounts and namespaces, ...) before the first cell runs. It talks
  to this server over two pipes: no socket, no file of the host it can write;
- **the evaluator** (trusted), one per /evaluate: forked from this server (so nothing of any
  episode's memory), it receives the episode's DB changes (the files AppWorld wrote to the
  episode's outputs after each cell: SQL statements the episode's process wrote, which
  AppWorld's loader runs verbatim), applies them under a row-only SQLite authorizer, runs
  AppWorld's own evaluation with the ground truth, which only it reads, and exits
  (`appworld_evaluation.py`). It returns the outcome without the traces of failed checks.

An episode that dies, or runs past its cell's deadline, is killed and answers 500 (the adapter's
crash recovery replays the episode in a fresh server). Where the OS cannot sandbox (no user
namespaces, no libseccomp), the server exits at start with the reason.
"""
import argparse
import http.server
import importlib.util
import json
import os
import resource
import select
import signal
import socketserver
import struct
import sys
import tempfile
import time
import traceback

_here = os.path.dirname(os.path.abspath(__file__))
# Run as a script, its folder comes first on sys.path, where loopjax's appworld.py would hide
# AppWorld's package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]


def _sibling(name: str):
    """A module of this folder, loaded by path (loopjax is not installed in AppWorld's venv)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(_here, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jail = _sibling("sandbox_jail")
evaluation = _sibling("appworld_evaluation")
cache = _sibling("appworld_cache")

OUTPUTS_MB = 64  # the episode's tmpfs for AppWorld's outputs (its DBs' changes, logs)
MEMORY_MB = 4096  # RLIMIT_AS of an episode
EPISODE_CPU_S = 1200  # RLIMIT_CPU of an episode (all its cells)
THREADS = 64  # RLIMIT_NPROC of an episode's own uid (AppWorld's API calls start threads)
GRACE_S = 10.0  # past AppWorld's own cell timeout, the server kills the episode
START_S = 120.0  # an episode's start-up (namespaces, world) or an evaluation at most
MAX_MESSAGE = 128 * 2 ** 20  # bytes of one message between processes


class EpisodeLost(Exception):
    """The episode's process died, or missed its deadline, and was killed."""


def send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd: int, deadline: float | None = None):
    """One message from `fd`; EpisodeLost on end of file, a deadline passed or a bad frame."""
    def read(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise EpisodeLost("no reply before the deadline")
            chunk = os.read(fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise EpisodeLost("the process ended")
            out += chunk
        return bytes(out)
    (n,) = struct.unpack("<Q", read(8))
    if n > MAX_MESSAGE:
        raise EpisodeLost(f"a reply of {n} bytes (limit {MAX_MESSAGE})")
    try:
        return json.loads(read(n))
    except ValueError as e:
        raise EpisodeLost(f"a malformed reply ({e})") from None


def python_paths() -> list[str]:
    """What the episode's root holds of the Python environment: the venv and the interpreter's
    library, outermost first (read-only)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, *jail.stdlib_dirs())}
    return sorted(p for p in paths if not any(p.startswith(q + os.sep) for q in paths))


def _mkdirs_at(new_root: str, path: str) -> str:
    inside = new_root + path
    os.makedirs(inside, exist_ok=True)
    return inside


def _chown_tree(top: str, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.chown(name, uid, uid, follow_symlinks=False)


def run_episode(root: str, new_root: str, task: dict, rfd: int, wfd: int) -> None:
    """The episode's process (never returns): sandbox, world, then one reply per request."""
    libc = jail._libc()
    load_seccomp = jail.build_seccomp(file_changes=True, threads=True)
    privileged = jail.unshare(libc)
    jail.mount(libc, "tmpfs", new_root, "tmpfs", jail.MS_NOSUID | jail.MS_NODEV,
               "size=1m,mode=0755")
    for path in python_paths():
        jail.bind_ro(libc, path, _mkdirs_at(new_root, path))
    data, outputs = os.path.join(root, "data"), os.path.join(root, "experiments", "outputs")
    jail.bind_ro(libc, data, _mkdirs_at(new_root, data))
    flags = jail.MS_NOSUID | jail.MS_NODEV | jail.MS_NOEXEC
    jail.mount(libc, "tmpfs", _mkdirs_at(new_root, outputs), "tmpfs", flags,
               f"size={OUTPUTS_MB}m,mode=0700")
    jail.mount(libc, "tmpfs", _mkdirs_at(new_root, "/home"), "tmpfs", flags, "size=4m,mode=0700")
    jail.pivot(libc, new_root)
    jail.mount(libc, None, "/", None, jail.MS_REMOUNT | jail.MS_BIND | jail.MS_RDONLY | flags)
    os.chdir(root)
    os.environ.update(HOME="/home", IPYTHONDIR="/home/.ipython", SQLITE_TMPDIR="/home")
    host_pid = os.getpid()
    pid = os.fork()  # the world runs as PID 1 of the new PID namespace
    if pid:
        os.close(rfd)
        os.close(wfd)
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
    from appworld.environment import AppWorld
    world = AppWorld(task_id=task["task_id"], experiment_name=task["experiment_name"],
                     load_ground_truth=False, timeout_seconds=task.get("timeout_seconds"),
                     random_seed=task.get("random_seed", 100))
    jail.check(libc.umount2(data.encode(), jail.MNT_DETACH), "umount of the task data")
    if privileged:
        for top in (outputs, "/home"):
            _chown_tree(top, jail.SANDBOX_UID_BASE + host_pid)
    jail.drop_privileges(libc, privileged, host_pid)
    for limit, value in ((resource.RLIMIT_AS, MEMORY_MB * 2 ** 20), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, OUTPUTS_MB * 2 ** 20),
                         (resource.RLIMIT_CPU, EPISODE_CPU_S), (resource.RLIMIT_NOFILE, 256)):
        resource.setrlimit(limit, (value, value))
    if privileged:  # its own uid: its threads are all it runs (seccomp refuses new processes)
        resource.setrlimit(resource.RLIMIT_NPROC, (THREADS, THREADS))
    load_seccomp()
    t = world.task
    send(wfd, {"output": {"task_id": t.id, "instruction": t.instruction,
                          "datetime": str(t.datetime),
                          "supervisor": {k: t.supervisor[k] for k in
                                         ("first_name", "last_name", "email", "phone_number")}}})
    while True:
        request = recv(rfd)
        op = request.get("op")
        if op == "execute":
            send(wfd, {"output": world.execute(str(request.get("code", "")))})
        elif op == "task_completed":
            send(wfd, {"output": bool(world.task_completed())})
        elif op == "dbs":  # the changes AppWorld saved after the last cell
            folder = world.output_db_home_path_on_disk
            files = {}
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name)) as f:
                    files[name] = f.read()
            send(wfd, {"output": files})


def run_evaluation(root: str, task_id: str, files: dict, _rfd: int, wfd: int) -> None:
    """The evaluator's process: the outcome of the episode's DB changes, or why they were
    refused."""
    try:
        send(wfd, {"output": evaluation.evaluate(root, task_id, files)})
    except evaluation.Refused as e:
        send(wfd, {"refused": str(e)})
    os._exit(0)


def _fork(target, *args) -> tuple[int, int, int]:
    """A child running target(*args, rfd, wfd) with only its two pipe ends open (stdio on
    /dev/null); returns (pid, fd to write to it, fd to read from it)."""
    to_child, from_child = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            keep = {to_child[0], from_child[1]}
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd > 2 and fd not in keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            jail.check(jail._libc().prctl(jail.PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl")
            target(*args, to_child[0], from_child[1])
        except BaseException as e:  # noqa: BLE001 (reported to the server, which answers)
            try:
                where = traceback.extract_tb(e.__traceback__)[-3:]
                send(from_child[1], {"error": f"{type(e).__name__}: {e} (at " + "; ".join(
                    f"{os.path.basename(f.filename)}:{f.lineno} {f.line}" for f in where) + ")"})
            finally:
                os._exit(3)
        os._exit(0)
    os.close(to_child[0])
    os.close(from_child[1])
    return pid, to_child[1], from_child[0]


def _end(pid: int, wfd: int, rfd: int) -> None:
    """A child from `_fork` killed and reaped, its pipes closed."""
    for fd in (wfd, rfd):
        os.close(fd)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


class Server:
    """The trusted relay: at most one episode, evaluations on demand."""

    def __init__(self, root: str):
        self.root = root
        self.new_root = tempfile.mkdtemp(prefix="loopjax-jail-")  # a mount point, never written
        self.episode: tuple[int, int, int] | None = None
        self.task: dict | None = None

    def kill(self) -> None:
        if self.episode is not None:
            _end(*self.episode)
        self.episode, self.task = None, None

    def _ask(self, request: dict | None, timeout: float):
        pid, wfd, rfd = self.episode
        try:
            if request is not None:
                send(wfd, request)
            reply = recv(rfd, time.monotonic() + timeout)
        except (EpisodeLost, OSError) as e:
            self.kill()
            raise EpisodeLost(f"the episode's process was lost ({e})") from None
        if "error" in reply:
            self.kill()
            raise EpisodeLost(reply["error"])
        return reply["output"]

    def initialize(self, body: dict):
        self.kill()
        self.task = dict(body)
        self.episode = _fork(run_episode, self.root, self.new_root, self.task)
        return self._ask(None, START_S)

    def execute(self, code: str):
        return self._ask({"op": "execute", "code": code},
                         (self.task.get("timeout_seconds") or 100) + GRACE_S)

    def task_completed(self):
        return self._ask({"op": "task_completed"}, START_S)

    def evaluate(self):
        files = self._ask({"op": "dbs"}, START_S)
        child = _fork(run_evaluation, self.root, self.task["task_id"], files)
        try:
            reply = recv(child[2], time.monotonic() + START_S)
        finally:
            _end(*child)
        if "refused" in reply:  # changes that do not load under the authorizer: nothing passes
            return {"success": False, "num_tests": 1, "passes": [],
                    "failures": [{"requirement": f"the episode's DB changes were refused: "
                                                 f"{reply['refused'][:300]}"}]}
        if "error" in reply:
            raise EpisodeLost(f"the evaluation failed: {reply['error']}")
        return reply["output"]


def _handler(server: Server):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the adapter keeps its own log
            pass

        def _reply(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(200, {"message": "AppWorld environment server, agent code sandboxed"})

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except ValueError:
                return self._reply(400, {"detail": "the body is not JSON"})
            route = self.path.strip("/")
            if route == "initialize":
                call = lambda: server.initialize(body)  # noqa: E731
            elif route in ("execute", "task_completed", "evaluate", "close"):
                if server.task is None or server.task["task_id"] != body.get("task_id"):
                    active = server.task and server.task["task_id"]
                    return self._reply(409, {"detail": f"the active task world is {active}, "
                                                       f"not {body.get('task_id')}"})
                call = {"execute": lambda: server.execute(str(body.get("code", ""))),
                        "task_completed": server.task_completed, "evaluate": server.evaluate,
                        "close": server.kill}[route]
            else:
                return self._reply(404, {"detail": f"no route /{route}"})
            try:
                self._reply(200, {"output": call()})
            except EpisodeLost as e:
                self._reply(500, {"detail": str(e)})
    return Handler


class _UnixServer(socketserver.UnixStreamServer):
    def get_request(self):  # a Unix socket has no client address; http.server expects one
        conn, _ = super().get_request()
        return conn, ("local", 0)


def probe(root: str) -> str | None:
    """Why an episode cannot be sandboxed here, or None: a child enters the sandbox and exits."""
    def enter(_root, rfd, wfd):
        libc = jail._libc()
        jail.build_seccomp(file_changes=True)
        jail.unshare(libc)
        send(wfd, {"output": "ok"})
    child = _fork(enter, root)
    try:
        return recv(child[2], time.monotonic() + START_S).get("error")
    except EpisodeLost as e:
        return str(e)
    finally:
        _end(*child)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="APPWORLD_ROOT (the folder holding data/)")
    parser.add_argument("--socket", required=True, help="the Unix socket path to listen on")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    os.environ["APPWORLD_ROOT"] = root
    os.chdir(root)
    import appworld.evaluator  # noqa: F401 (imported once: every fork starts with it)
    import pytest  # noqa: F401 (AppWorld's checks import it on first use: 0.04 s per evaluation)
    cache.warm_up(root)
    problem = probe(root)
    if problem:
        print(f"agent code cannot be sandboxed on this machine: {problem}. loopjax runs AppWorld's "
              "agent code only inside an OS sandbox (Linux user/mount/PID/network namespaces, "
              "seccomp through libseccomp2): fix the cause, or accept the risk of running it in "
              "AppWorld's own server, guarded only by its blocklist, beside the ground truth, "
              "with LOOPJAX_UNSAFE_NO_OS_SANDBOX=1.", flush=True)
        return 3
    server, parent = Server(root), os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with _UnixServer(args.socket, _handler(server)) as httpd:
            os.chmod(args.socket, 0o600)
            httpd.timeout = 1.0
            while os.getppid() == parent:  # a trainer that was killed leaves no server behind
                httpd.handle_request()
    finally:
        server.kill()
        os.rmdir(server.new_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The AppWorld environment server as a process: its command, start, stop, and HTTP requests.

`AppWorldServer` runs one AppWorld environment server in AppWorld's own virtualenv (see
`loopjax.envs.appworld_setup`): `appworld_suite/serve.py`, AppWorld's own app on a Unix socket
in a private temporary folder (mode 0700; never a network port), in its own session, logging to a
temporary file, and stops it (SIGTERM, then SIGKILL to its group) on stop() and at interpreter
exit. A custom command (`server_command`, with "{socket}" or "{port}" and "{root}") replaces it;
with `server_url` the env speaks to an already-running server and never starts or stops one.
`post()` sorts failures for the env's crash policy: a dead, hung or 5xx-answering server raises
`ServerCrash`; a 4xx (a request loopjax got wrong, or a world the server has not loaded) raises
`AppWorldError`.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref

log = logging.getLogger(__name__)

INSTALL_HELP = """AppWorld runs in its own virtualenv (its pinned dependencies clash with JAX's). \
Make it,
with the AppWorld-format task suite built offline from the package's own apps:
    python -m loopjax.envs.appworld_setup
and use it with `--env appworld-synth`. With AppWorld's own data (`appworld download data`),
point the adapter at it: export APPWORLD_ROOT=/path/to/root \
APPWORLD_PYTHON=/path/to/venv/bin/python"""
_HERE = os.path.dirname(os.path.abspath(__file__))
# The server loopjax runs: agent code in an OS sandbox, evaluation in a process of its own.
JAIL_SCRIPT = os.path.join(_HERE, "appworld_jail.py")
# AppWorld's own app (agent code in the server's process, behind AppWorld's blocklist only): what
# runs where the OS cannot sandbox and the user accepted the risk (LOOPJAX_UNSAFE_NO_OS_SANDBOX=1).
SERVE_SCRIPT = os.path.join(_HERE, "appworld_suite", "serve.py")
UNSAFE_ENV = "LOOPJAX_UNSAFE_NO_OS_SANDBOX"


class AppWorldError(RuntimeError):
    """The AppWorld server could not do what was asked (message says what to change)."""


class AppWorldUnavailable(AppWorldError, NotImplementedError):
    """AppWorld (the package, its command or its data) is not installed where loopjax looks.
    (Also a NotImplementedError, which is what make_env("appworld") raised before this adapter.)"""


class ServerCrash(Exception):
    """The server died, hung past a timeout, or failed a request with 5xx (answered=True)."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


@dataclasses.dataclass(frozen=True)
class AppWorldConfig:
    root: str | None = None  # APPWORLD_ROOT: the folder holding data/ (default: $APPWORLD_ROOT)
    python: str | None = None  # python of AppWorld's venv (default: $APPWORLD_PYTHON)
    # Full server command with {socket} or {port}, and {root} placeholders (default:
    # $APPWORLD_SERVER_COMMAND); overrides `python`. Without either, loopjax's own set-up is used.
    server_command: str | tuple[str, ...] | None = None
    server_url: str | None = None  # use this already-running server instead (it is never restarted)
    experiment_name: str = "loopjax"  # AppWorld output folder prefix; each env adds a unique suffix
    cell_timeout_s: int = 100  # AppWorld's own limit on one code cell (its timeout_seconds)
    execute_timeout_s: float = 150.0  # HTTP timeout of /execute; past it the server counts as hung
    request_timeout_s: float = 60.0  # HTTP timeout of every other request
    startup_timeout_s: float = 180.0  # how long a starting server may take to answer GET /
    max_restarts: int = 2  # server restarts allowed per episode before it is recorded as failed
    random_seed: int = 100  # AppWorld's default seed

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("execute_timeout_s", "request_timeout_s", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_appworld(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('appworld') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def server_command(config: AppWorldConfig, root: str) -> list[str]:
    """The command that starts an environment server, with "{socket}" (or a custom command's
    "{port}") left for start() to fill."""
    custom = config.server_command or os.environ.get("APPWORLD_SERVER_COMMAND")
    if custom:
        parts = shlex.split(custom) if isinstance(custom, str) else list(custom)
        return [p.replace("{root}", root) for p in parts]
    python = config.python or os.environ.get("APPWORLD_PYTHON")
    if not python:  # the set-up's venv, whatever root this server is for
        from loopjax.envs.appworld_setup import venv_python  # noqa: PLC0415 (optional set-up)
        python = venv_python()
        if python is None:
            raise AppWorldUnavailable(f"no AppWorld to run: set APPWORLD_PYTHON (or "
                                      f"APPWORLD_SERVER_COMMAND).\n{INSTALL_HELP}")
    python = os.path.expanduser(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise AppWorldUnavailable(f"APPWORLD_PYTHON={python} is not an executable file.\n"
                                  f"{INSTALL_HELP}")
    if not _has_appworld(python):
        raise AppWorldUnavailable(f"{python} cannot import appworld.\n{INSTALL_HELP}")
    unsafe = os.environ.get(UNSAFE_ENV, "") not in ("", "0")
    if unsafe:
        log.warning("%s is set: AppWorld runs agent code in its own server process, guarded only "
                    "by its blocklist, beside the task's ground truth", UNSAFE_ENV)
    return [python, SERVE_SCRIPT if unsafe else JAIL_SCRIPT, "--root", root, "--socket", "{socket}"]


_LIVE_SERVERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_servers() -> None:  # servers run in their own session, so no terminal signal reaches them
    for server in list(_LIVE_SERVERS):
        server.stop()


class AppWorldServer:
    """One `appworld serve environment` process (or an external server_url), spoken to by HTTP."""

    def __init__(self, config: AppWorldConfig, root: str | None):
        self.config, self.root = config, root
        self.proc: subprocess.Popen | None = None
        self.url = config.server_url.rstrip("/") if config.server_url else None
        self.log_path: str | None = None
        self._socket_dir: str | None = None  # the managed server's private socket folder
        _LIVE_SERVERS.add(self)

    @property
    def managed(self) -> bool:
        return self.config.server_url is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if not self.managed:
            if not self._answers():
                raise AppWorldError(f"AppWorld server at {self.url} does not answer GET /")
            return
        template = server_command(self.config, self.root)
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="loopjax-appworld-", suffix=".log")
            os.close(fd)
        for _ in range(3):  # another process may grab a free port before the server binds it
            cmd, self.url = self._fill(template)
            with open(self.log_path, "ab") as logf:
                logf.write(f"\n$ {shlex.join(cmd)}\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.root,
                                             env=dict(os.environ, APPWORLD_ROOT=self.root),
                                             start_new_session=True)  # its own group, killed as one
            if self._wait_ready():
                log.info("AppWorld server pid %d at %s (log %s)", self.proc.pid, self.url,
                         self.log_path)
                return
            tail = self.log_tail()
            self.stop()
            if "address already in use" not in tail.lower():
                raise AppWorldError(f"the AppWorld server did not start ({shlex.join(cmd)}); "
                                    f"the end of its log {self.log_path}:\n{tail}\n{INSTALL_HELP}")
        raise AppWorldError(f"the AppWorld server could not bind a port; see {self.log_path}")

    def _fill(self, template: list[str]) -> tuple[list[str], str]:
        """The command with its socket path (in a fresh folder of this user's) or port filled."""
        if any("{socket}" in p for p in template):
            if self._socket_dir is None:
                self._socket_dir = tempfile.mkdtemp(prefix="loopjax-appworld-")  # mode 0700
            path = os.path.join(self._socket_dir, "server.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a killed server's socket file
            return [p.replace("{socket}", path) for p in template], f"unix:{path}"
        port = _free_port()
        return [p.replace("{port}", str(port)) for p in template], f"http://127.0.0.1:{port}"

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.1)
        return False

    def _answers(self) -> bool:
        try:
            return self._request("GET", "/", None, 2.0)[0] == 200
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def _request(self, verb: str, path: str, body: bytes | None,
                 timeout: float) -> tuple[int, bytes]:
        """One HTTP request over the server's Unix socket or TCP address: (status, body)."""
        if self.url.startswith("unix:"):
            conn: http.client.HTTPConnection = _UnixConnection(self.url[5:], timeout)
        else:
            u = urllib.parse.urlsplit(self.url)
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
            path = u.path.rstrip("/") + path
        try:
            conn.request(verb, path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if self._socket_dir is not None:  # the server no longer needs its socket's folder
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group this server leads (start_new_session)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not os.path.isfile(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def post(self, method: str, body: dict, timeout: float):
        """{"output": X} -> X. Raises ServerCrash when the server is gone, hung or fails with 5xx,
        AppWorldError on a 4xx (a request loopjax got wrong, or a world it has not loaded)."""
        if self.managed and (self.proc is None or self.proc.poll() is not None):
            raise ServerCrash("the server process is not running")
        try:
            status, raw = self._request("POST", f"/{method}", json.dumps(body).encode(), timeout)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
            raise ServerCrash(f"/{method}: {type(e).__name__}: {e}") from None
        text = raw.decode(errors="replace")[-2000:]
        if status >= 500:
            raise ServerCrash(f"/{method} failed with HTTP {status}: {text}", answered=True)
        if status >= 400:
            raise AppWorldError(f"AppWorld server rejected /{method} (HTTP {status}): {text}")
        try:
            return json.loads(raw)["output"]
        except (ValueError, KeyError) as e:
            raise ServerCrash(f"/{method}: bad reply ({type(e).__name__}: {e})") from None


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the server's address is a path, not a port)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock

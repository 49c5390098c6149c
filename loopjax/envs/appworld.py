"""The Env protocol over the real AppWorld, through its environment server.

AppWorld pins its own dependencies, so (as the LOOP authors do) it lives in its own virtualenv and
loopjax talks to `appworld serve environment --port N` over HTTP (stdlib urllib only). Each
AppWorldEnv owns one server process (the server holds one task world at a time), started on first
use and stopped by close(). Set up once:

    python -m venv ~/appworld-venv && ~/appworld-venv/bin/pip install appworld
    cd ~/appworld-root && ~/appworld-venv/bin/appworld install && ~/appworld-venv/bin/appworld download data
    export APPWORLD_ROOT=~/appworld-root APPWORLD_PYTHON=~/appworld-venv/bin/python

Server protocol (AppWorld's appworld/serve/environment.py): POST JSON bodies, replies {"output": ...}:
/initialize {task_id, experiment_name, timeout_seconds, random_seed, ...} -> task (instruction,
supervisor, datetime); /execute {task_id, code} -> printed output or "Execution failed. Traceback..";
/task_completed {task_id} -> bool; /evaluate {task_id, suppress_errors, report} -> TestTracker dict
{success, difficulty, num_tests, passes: [{requirement, label}], failures: [{requirement, trace, label}]};
/close {task_id}. GET / answers once the server is up.

Crash policy: when the server dies, hangs past a timeout or answers 5xx during step() or evaluate(),
the env restarts it, re-initializes the task and replays the episode's earlier code cells, checking
that each replayed cell prints what it printed the first time (AppWorld is deterministic: frozen
clock, fixed seed), then retries the call. After `max_restarts` restarts in one episode, or if a
replay diverges, the episode is recorded as failed: step() returns done=True with an error message,
evaluate() returns reward 0 with the reason in `failures`, and `env.failure` holds the reason (so a
collector can drop the episode instead of training on it). The next reset() starts clean; the run
goes on. reset() itself retries the same way and raises AppWorldError if it cannot start a task.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
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
import urllib.error
import urllib.request
import weakref
from collections import defaultdict
from typing import Mapping

from loopjax.envs.base import EvalResult, Observation, StepResult, Supervisor, scenario_id

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test_normal", "test_challenge")
# The paper trains on AppWorld's train tasks of difficulty 1 and 2 (72 tasks).
SPLIT_ALIASES = {"paper_train": "train:difficulty=1,2"}
# AppWorld's user-facing apps (its APP_TO_DESCRIPTION, admin excluded), as the agent sees them.
APPWORLD_APPS = ("api_docs", "supervisor", "amazon", "phone", "file_system", "spotify", "venmo",
                 "gmail", "splitwise", "simple_note", "todoist")
INSTALL_HELP = """AppWorld is installed in its own virtualenv (its pinned dependencies clash with JAX's):
    python -m venv ~/appworld-venv
    ~/appworld-venv/bin/pip install appworld
    mkdir -p ~/appworld-root && cd ~/appworld-root
    ~/appworld-venv/bin/appworld install
    ~/appworld-venv/bin/appworld download data
    export APPWORLD_ROOT=~/appworld-root APPWORLD_PYTHON=~/appworld-venv/bin/python"""


class AppWorldError(RuntimeError):
    """The AppWorld server could not do what was asked (message says what to change)."""


class AppWorldUnavailable(AppWorldError, NotImplementedError):
    """AppWorld (the package, its command or its data) is not installed where loopjax looks.
    (Also a NotImplementedError, which is what make_env("appworld") raised before this adapter.)"""


class _Crash(Exception):
    """The server died, hung past a timeout, or failed a request with 5xx (answered=True)."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


@dataclasses.dataclass(frozen=True)
class AppWorldConfig:
    root: str | None = None  # APPWORLD_ROOT: the folder holding data/ (default: $APPWORLD_ROOT)
    python: str | None = None  # python of AppWorld's venv (default: $APPWORLD_PYTHON)
    # Full server command with {port} and {root} placeholders (default: $APPWORLD_SERVER_COMMAND);
    # overrides `python`. Without either, `appworld` on PATH is used.
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


# ----------------------------------------------------------------------------- data files


def appworld_root(root: str | None = None) -> str:
    """The AppWorld root (the folder with data/tasks and data/datasets); raises with install help."""
    root = root or os.environ.get("APPWORLD_ROOT")
    if not root:
        raise AppWorldUnavailable(f"APPWORLD_ROOT is not set (the folder where `appworld download "
                                  f"data` put data/).\n{INSTALL_HELP}")
    root = os.path.abspath(os.path.expanduser(root))
    for sub in ("tasks", "datasets"):
        if not os.path.isdir(os.path.join(root, "data", sub)):
            raise AppWorldUnavailable(f"{os.path.join(root, 'data', sub)} does not exist: APPWORLD_ROOT="
                                      f"{root} holds no AppWorld data.\n{INSTALL_HELP}")
    return root


def task_difficulty(task_id: str, root: str | None = None) -> int:
    """A task's difficulty (1-3) from data/tasks/<id>/ground_truth/metadata.json."""
    path = os.path.join(appworld_root(root), "data", "tasks", task_id, "ground_truth", "metadata.json")
    try:
        with open(path) as f:
            return int(json.load(f)["difficulty"])
    except (OSError, KeyError, ValueError) as e:
        raise AppWorldError(f"cannot read the difficulty of task {task_id!r} from {path}: {e}") from e


def appworld_task_ids(split: str, root: str | None = None) -> list[str]:
    """Task ids of "<split>" or "<split>:difficulty=1,2" (split in SPLITS), or an alias
    ("paper_train" = the paper's 72 training tasks), in the order of AppWorld's dataset file."""
    spec = SPLIT_ALIASES.get(split, split)
    name, _, filt = spec.partition(":")
    if name not in SPLITS or (filt and not filt.startswith("difficulty=")):
        raise ValueError(f"unknown AppWorld split {split!r}; use one of {list(SPLITS)}, optionally "
                         f"with ':difficulty=1,2', or an alias {sorted(SPLIT_ALIASES)}")
    root = appworld_root(root)
    path = os.path.join(root, "data", "datasets", f"{name}.txt")
    if not os.path.isfile(path):
        raise AppWorldUnavailable(f"{path} does not exist (incomplete AppWorld data?)\n{INSTALL_HELP}")
    with open(path) as f:  # lines may carry a ":tag" suffix, which AppWorld strips
        ids = [line.strip().split(":")[0] for line in f if line.strip()]
    if filt:
        try:
            keep = {int(d) for d in filt[len("difficulty="):].split(",")}
        except ValueError:
            raise ValueError(f"bad difficulty list in split {split!r}; e.g. 'train:difficulty=1,2'") from None
        ids = [t for t in ids if task_difficulty(t, root) in keep]
    return ids


def goal_completion(successes: Mapping[str, bool | EvalResult]) -> dict[str, float]:
    """AppWorld's TGC and SGC in percent (rounded to 0.1 as AppWorld rounds): TGC = share of tasks
    with every test passed; SGC = share of scenarios (task id before "_") whose tasks all pass."""
    by_scenario: dict[str, list[float]] = defaultdict(list)
    for task_id, r in successes.items():
        ok = r.success if isinstance(r, EvalResult) else bool(r)
        by_scenario[scenario_id(str(task_id).split(":")[0])].append(float(ok))
    if not by_scenario:
        raise ValueError("goal_completion needs at least one task result")
    tasks = [s for scores in by_scenario.values() for s in scores]
    scen = [min(scores) for scores in by_scenario.values()]
    pct = lambda xs: round(100 * round(sum(xs) / len(xs), 4), 1)  # noqa: E731
    return {"task_goal_completion": pct(tasks), "scenario_goal_completion": pct(scen)}


# ----------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_appworld(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('appworld') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def server_command(config: AppWorldConfig, root: str) -> list[str]:
    """The command that starts an environment server, with "{port}" left for start() to fill."""
    custom = config.server_command or os.environ.get("APPWORLD_SERVER_COMMAND")
    if custom:
        parts = shlex.split(custom) if isinstance(custom, str) else list(custom)
        return [p.replace("{root}", root) for p in parts]
    args = ["serve", "environment", "--port", "{port}", "--root", root, "--no-show-usage"]
    python = config.python or os.environ.get("APPWORLD_PYTHON")
    if python:
        python = os.path.expanduser(python)
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise AppWorldUnavailable(f"APPWORLD_PYTHON={python} is not an executable file.\n{INSTALL_HELP}")
        if not _has_appworld(python):
            raise AppWorldUnavailable(f"{python} cannot import appworld.\n{INSTALL_HELP}")
        return [python, "-m", "appworld.cli", *args]
    exe = shutil.which("appworld")
    if exe is None:
        raise AppWorldUnavailable("no AppWorld server command: set APPWORLD_PYTHON (or "
                                  f"APPWORLD_SERVER_COMMAND), or put `appworld` on PATH.\n{INSTALL_HELP}")
    return [exe, *args]


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
        for _ in range(3):  # another process may grab the free port before the server binds it
            port = _free_port()
            cmd = [p.replace("{port}", str(port)) for p in template]
            with open(self.log_path, "ab") as logf:
                logf.write(f"\n$ {shlex.join(cmd)}\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.root,
                                             env=dict(os.environ, APPWORLD_ROOT=self.root),
                                             start_new_session=True)  # its own group, killed as one
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                log.info("AppWorld server pid %d at %s (log %s)", self.proc.pid, self.url, self.log_path)
                return
            tail = self.log_tail()
            self.stop()
            if "address already in use" not in tail.lower():
                raise AppWorldError(f"the AppWorld server did not start ({shlex.join(cmd)}); the end "
                                    f"of its log {self.log_path}:\n{tail}\n{INSTALL_HELP}")
        raise AppWorldError(f"the AppWorld server could not bind a port; see {self.log_path}")

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
            with urllib.request.urlopen(self.url + "/", timeout=2.0) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
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
        """{"output": X} -> X. Raises _Crash when the server is gone, hung or fails with 5xx,
        AppWorldError on a 4xx (a request loopjax got wrong)."""
        if self.managed and (self.proc is None or self.proc.poll() is not None):
            raise _Crash("the server process is not running")
        req = urllib.request.Request(f"{self.url}/{method}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["output"]
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")[-2000:]
            if e.code >= 500:
                raise _Crash(f"/{method} failed with HTTP {e.code}: {text}", answered=True) from None
            raise AppWorldError(f"AppWorld server rejected /{method} (HTTP {e.code}): {text}") from None
        except (OSError, ValueError, KeyError) as e:  # refused, reset, timed out, bad JSON
            raise _Crash(f"/{method}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- the env

_ENV_IDS = itertools.count()


class AppWorldEnv:
    """The Env protocol over one AppWorld environment server (see the module docstring).

    Options: an AppWorldConfig as `config`, or its fields as keywords.
    """

    def __init__(self, config: AppWorldConfig | None = None, **options):
        self.config = config or AppWorldConfig(**options)
        needs_root = self.config.server_url is None
        self.root = appworld_root(self.config.root) if (needs_root or self.config.root or
                                                          os.environ.get("APPWORLD_ROOT")) else None
        self.server = AppWorldServer(self.config, self.root)
        # Parallel envs on one task must not share AppWorld's output folder (evaluation reads it).
        self.experiment_name = f"{self.config.experiment_name}_{os.getpid()}_{next(_ENV_IDS)}"
        self.task_id: str | None = None
        self.history: list[tuple[str, str]] = []  # (code, output) of this episode's cells
        self.done = False
        self.failure: str | None = None  # why this episode was recorded as failed, else None
        self.restarts = 0  # server restarts in this episode
        self.total_restarts = 0
        self.last_evaluation: dict | None = None  # AppWorld's raw TestTracker dict
        self._stale = False  # the server lost this episode's world (rebuild before the next call)

    # -- Env protocol ---------------------------------------------------------------------------
    def reset(self, task_id: str) -> Observation:
        task_id = str(task_id)
        if self.root is not None and not os.path.isdir(os.path.join(self.root, "data", "tasks", task_id)):
            raise ValueError(f"unknown AppWorld task {task_id!r} (no {self.root}/data/tasks/{task_id}); "
                             "see list_tasks('appworld', split)")
        if self.server.managed and self.server.proc is None:
            self.server.start()
        elif self.task_id is not None and not self._stale:
            self._close_world()
        self.task_id, self.history, self.done, self.failure = task_id, [], False, None
        self.restarts, self.last_evaluation, self._stale = 0, None, False
        while True:
            try:
                task = self._initialize()
                self._stale = False
                break
            except _Crash as e:
                # A server that answers 5xx to /initialize is up but cannot load the task (its
                # data is incomplete or the task broken): restarting would not help.
                if e.answered or self.restarts >= self.config.max_restarts or not self.server.managed:
                    self.task_id = None  # no episode: step() now asks for a reset
                    raise AppWorldError(f"could not initialize AppWorld task {task_id}: {e}\n"
                                        f"server log {self.server.log_path}:\n{self.server.log_tail()}")
                self._restart(e)
        sup = task["supervisor"]
        return Observation(task_id, task["instruction"],
                           Supervisor(sup["first_name"], sup["last_name"], sup["email"],
                                      sup["phone_number"]),
                           str(task["datetime"])[:10], APPWORLD_APPS, "appworld")

    def step(self, code: str) -> StepResult:
        """Run one code cell; done once the agent called apis.supervisor.complete_task."""
        self._need_episode()
        if self.failure is not None:
            return StepResult(f"Environment failure: {self.failure}. The episode is over.", True)
        if self.done:
            return StepResult("The task is already completed; the episode is over.", True)

        def run():
            output = self._post("execute", {"code": code}, self.config.execute_timeout_s)
            completed = bool(self._post("task_completed", {}, self.config.request_timeout_s))
            return output, completed

        result = self._recovering(run)
        if result is None:
            return StepResult(f"Environment failure: {self.failure}. The episode is over.", True)
        output, self.done = result
        self.history.append((code, output))
        return StepResult(output, self.done)

    def evaluate(self) -> EvalResult:
        """AppWorld's unit tests over the final state; reward = passes / num_tests."""
        self._need_episode()
        out = None if self.failure else self._recovering(lambda: self._post(
            "evaluate", {"suppress_errors": True, "report": False}, self.config.request_timeout_s))
        if out is None:
            return EvalResult(0, (), (f"environment failure: {self.failure}",), 0.0, False)
        self.last_evaluation = out
        passes = tuple(p["requirement"] for p in out["passes"])
        failures = tuple(f["requirement"] for f in out["failures"])
        n = int(out["num_tests"])
        return EvalResult(n, passes, failures, len(passes) / n if n else 0.0, bool(out["success"]))

    def close(self) -> None:
        if self.task_id is not None and not self._stale:
            self._close_world()
        self.server.stop()
        self.task_id = None

    # -- helpers --------------------------------------------------------------------------------
    @property
    def server_pid(self) -> int | None:
        return self.server.pid

    def _post(self, method: str, body: dict, timeout: float):
        return self.server.post(method, dict(body, task_id=self.task_id), timeout)

    def _initialize(self) -> dict:
        return self._post("initialize", {"experiment_name": self.experiment_name,
                                         "timeout_seconds": self.config.cell_timeout_s,
                                         "random_seed": self.config.random_seed},
                          self.config.request_timeout_s)

    def _close_world(self) -> None:
        try:
            self._post("close", {}, self.config.request_timeout_s)
        except (_Crash, AppWorldError) as e:  # closing is best effort: the next task starts anew
            log.debug("AppWorld /close failed: %s", e)

    def _restart(self, reason) -> None:
        self.restarts += 1
        self.total_restarts += 1
        log.warning("AppWorld server failed (%s); restart %d/%d of task %s", reason, self.restarts,
                    self.config.max_restarts, self.task_id)
        self._stale = True
        self.server.restart()

    def _recovering(self, action):
        """action() with crash recovery (restart, re-initialize, replay); None once failed."""
        while True:
            try:
                if self._stale:
                    self._rebuild()
                return action()
            except _Crash as e:
                if self.restarts >= self.config.max_restarts or not self.server.managed:
                    return self._fail(f"the AppWorld server failed {self.restarts + 1} time(s) in "
                                      f"this episode; last: {e}")
                try:
                    self._restart(e)
                except AppWorldError as e2:
                    return self._fail(f"the AppWorld server could not be restarted: {e2}")
            except _Diverged as e:
                return self._fail(str(e))

    def _rebuild(self) -> None:
        self._initialize()
        for i, (code, output) in enumerate(self.history):
            again = self._post("execute", {"code": code}, self.config.execute_timeout_s)
            if again != output:
                raise _Diverged(f"replaying cell {i} after a server restart printed something else "
                                f"than the first time ({again[:200]!r} vs {output[:200]!r})")
        self._stale = False

    def _fail(self, reason: str):
        self.failure = reason
        log.warning("AppWorld episode %s recorded as failed: %s", self.task_id, reason)
        return None

    def _need_episode(self) -> None:
        if self.task_id is None:
            raise RuntimeError("call reset(task_id) before step() or evaluate()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Diverged(Exception):
    """A replayed cell printed something else than it did the first time."""

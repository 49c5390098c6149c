"""The Env protocol over the real AppWorld, through its environment server.

AppWorld pins its own dependencies, so (as the LOOP authors do) it lives in its own virtualenv and
loopjax talks to its environment server over HTTP on a Unix socket (stdlib only). Each
AppWorldEnv owns one server process (the server holds one task world at a time), started on first
use and stopped by close() (the process itself: `loopjax.envs.appworld_server`). Set up once,
offline, with an AppWorld-format task suite built from the package's own apps:

    python -m loopjax.envs.appworld_setup      # then make_env("appworld-synth")

or point APPWORLD_ROOT (the folder with data/) and APPWORLD_PYTHON at AppWorld's own data and venv
for make_env("appworld"): the adapter is the same.

Server protocol (AppWorld's appworld/serve/environment.py): POST JSON bodies, replies
{"output": ...}: /initialize {task_id, experiment_name, timeout_seconds, random_seed, ...} -> task
(instruction, supervisor, datetime); /execute {task_id, code} -> printed output or
"Execution failed. Traceback.."; /task_completed {task_id} -> bool; /evaluate {task_id,
suppress_errors, report} -> TestTracker dict {success, difficulty, num_tests,
passes: [{requirement, label}], failures: [{requirement, trace, label}]}; /close {task_id}.
GET / answers once the server is up. `ground_truth_mode` is never sent (its upstream type is
wrong; the server's default, minimal, is what evaluation needs).

An episode ends when a cell calls apis.supervisor.complete_task(...): that step() returns
done=True, any later step() returns done=True with "The task is already completed" and runs
nothing, and evaluate() grades the state the episode left (the answer given, the DB changes).

Crash policy: when the server dies, hangs past a timeout or answers 5xx during step() or evaluate(),
the env restarts it, re-initializes the task and replays the episode's earlier code cells, checking
that each replayed cell prints what it printed the first time (AppWorld is deterministic: frozen
clock, fixed seed), then retries the call. After `max_restarts` restarts in one episode, or if a
replay diverges, the episode is recorded as failed: step() returns done=True with an error message,
evaluate() returns reward 0 with the reason in `failures`, and `env.failure` holds the reason (so a
collector can drop the episode instead of training on it). The next reset() starts clean; the run
goes on. reset() itself retries the same way and raises AppWorldError if it cannot start a task.
A 4xx answer (a request for a world the server has not loaded) is an AppWorldError, never a crash.
"""
from __future__ import annotations

import ast
import functools
import itertools
import json
import logging
import os
import textwrap
from collections import defaultdict
from collections.abc import Mapping

# AppWorldConfig, the errors and INSTALL_HELP are imported from here by callers (and tests) too.
from loopjax.envs.appworld_server import (
    INSTALL_HELP,
    AppWorldConfig,
    AppWorldError,
    AppWorldServer,
    AppWorldUnavailable,
    ServerCrash,
)
from loopjax.envs.base import EvalResult, Observation, StepResult, Supervisor, scenario_id

log = logging.getLogger(__name__)

# The paper trains on AppWorld's train tasks of difficulty 1 and 2 (72 tasks).
SPLIT_ALIASES = {"paper_train": "train:difficulty=1,2"}
# AppWorld's user-facing apps (its APP_TO_DESCRIPTION, admin excluded), as the agent sees them.
APPWORLD_APPS = ("api_docs", "supervisor", "amazon", "phone", "file_system", "spotify", "venmo",
                 "gmail", "splitwise", "simple_note", "todoist")


# ----------------------------------------------------------------------------- data files


def appworld_root(root: str | None = None) -> str:
    """The AppWorld root (the folder with data/tasks and data/datasets); raises with install
    help."""
    root = root or os.environ.get("APPWORLD_ROOT")
    if not root:
        raise AppWorldUnavailable(f"APPWORLD_ROOT is not set (the folder where `appworld download "
                                  f"data` put data/).\n{INSTALL_HELP}")
    root = os.path.abspath(os.path.expanduser(root))
    for sub in ("tasks", "datasets"):
        if not os.path.isdir(os.path.join(root, "data", sub)):
            raise AppWorldUnavailable(f"{os.path.join(root, 'data', sub)} does not exist: "
                                      f"APPWORLD_ROOT={root} holds no AppWorld data.\n"
                                      f"{INSTALL_HELP}")
    return root


def synth_installation() -> tuple[str, str]:
    """(AppWorld's venv python, the suite's root) of `python -m loopjax.envs.appworld_setup`;
    an explicit $APPWORLD_PYTHON wins over the set-up's venv."""
    from loopjax.envs.appworld_setup import default_home  # noqa: PLC0415

    return _synth_installation(default_home(), os.environ.get("APPWORLD_PYTHON"))


@functools.cache
def _synth_installation(home: str, python: str | None) -> tuple[str, str]:
    # Looked up (and the suite built when stale) once per set-up and process: every env, task
    # list and solution of a run reads it, and the lookup runs AppWorld's python.
    from loopjax.envs.appworld_setup import installed  # noqa: PLC0415

    found = installed(home)
    if found is None:
        raise AppWorldUnavailable("the AppWorld-format suite is not set up (looked in "
                                  f"$LOOPJAX_APPWORLD_HOME or ~/.cache/loopjax/appworld).\n"
                                  f"{INSTALL_HELP}")
    return found[0] if python is None else python, found[1]


def task_difficulty(task_id: str, root: str | None = None) -> int:
    """A task's difficulty (1-3) from data/tasks/<id>/ground_truth/metadata.json."""
    path = os.path.join(appworld_root(root), "data", "tasks", task_id, "ground_truth",
                        "metadata.json")
    try:
        with open(path) as f:
            return int(json.load(f)["difficulty"])
    except (OSError, KeyError, ValueError) as e:
        raise AppWorldError(f"cannot read the difficulty of task {task_id!r} from {path}: "
                            f"{e}") from e


def dataset_names(root: str | None = None) -> list[str]:
    """The split names a root has: its data/datasets/<name>.txt files."""
    folder = os.path.join(appworld_root(root), "data", "datasets")
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))


def appworld_task_ids(split: str, root: str | None = None) -> list[str]:
    """Task ids of "<split>" or "<split>:difficulty=1,2" (split: one of the root's datasets
    files, e.g. train, dev, test_normal, test_challenge), or an alias ("paper_train" = the
    paper's 72 training tasks), in the order of the dataset file."""
    spec = SPLIT_ALIASES.get(split, split)
    name, _, filt = spec.partition(":")
    root = appworld_root(root)
    names = dataset_names(root)
    if name not in names or (filt and not filt.startswith("difficulty=")):
        raise ValueError(f"unknown AppWorld split {split!r}; {root} has {names}, optionally "
                         f"with ':difficulty=1,2', or an alias {sorted(SPLIT_ALIASES)}")
    with open(os.path.join(root, "data", "datasets", f"{name}.txt")) as f:
        ids = [line.strip().split(":")[0] for line in f if line.strip()]  # AppWorld strips ":tag"
    if filt:
        try:
            keep = {int(d) for d in filt[len("difficulty="):].split(",")}
        except ValueError:
            raise ValueError(f"bad difficulty list in split {split!r}; "
                             "e.g. 'train:difficulty=1,2'") from None
        ids = [t for t in ids if task_difficulty(t, root) in keep]
    return ids


def solution_cells(task_id: str, root: str | None = None) -> list[str]:
    """A task's ground-truth solution as code cells: the body of `solution(apis, requester)` in
    ground_truth/solution.py (AppWorld's form), split at blank lines between whole statements."""
    path = os.path.join(appworld_root(root), "data", "tasks", task_id, "ground_truth",
                        "solution.py")
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise AppWorldError(f"task {task_id!r} has no ground-truth solution ({path}): {e}") from e
    fn = next((n for n in ast.parse(source).body
               if isinstance(n, ast.FunctionDef) and n.name == "solution"), None)
    if fn is None:
        raise AppWorldError(f"{path} defines no solution(apis, requester)")
    lines = source.splitlines()
    body = textwrap.dedent("\n".join(lines[fn.body[0].lineno - 1:fn.body[-1].end_lineno]))
    body_lines = body.splitlines()
    cells, current = [], []
    for stmt in ast.parse(body).body:  # a cell ends at a blank line before a statement
        text = ast.get_source_segment(body, stmt, padded=False)
        gap = current and body_lines[stmt.lineno - 2].strip() == ""
        if gap:
            cells.append("\n".join(current))
            current = []
        current.append(text)
    if current:
        cells.append("\n".join(current))
    return cells


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
        if (self.root is not None
                and not os.path.isdir(os.path.join(self.root, "data", "tasks", task_id))):
            raise ValueError(f"unknown AppWorld task {task_id!r} "
                             f"(no {self.root}/data/tasks/{task_id}); "
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
            except ServerCrash as e:
                # A server that answers 5xx to /initialize is up but cannot load the task (its
                # data is incomplete or the task broken): restarting would not help.
                if (e.answered or self.restarts >= self.config.max_restarts
                        or not self.server.managed):
                    self.task_id = None  # no episode: step() now asks for a reset
                    raise AppWorldError(f"could not initialize AppWorld task {task_id}: {e}\n"
                                        f"server log {self.server.log_path}:\n"
                                        f"{self.server.log_tail()}") from e
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
        except (ServerCrash, AppWorldError) as e:
            log.debug("AppWorld /close failed: %s", e)  # best effort: the next task starts anew

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
            except ServerCrash as e:
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

"""Run agent code in a separate, OS-sandboxed worker process (the trainer side of the sandbox).

`Sandbox(limits)` owns one worker process (`sandbox_process.py` starts it and frames its pipe;
`sandbox_worker.py` is the REPL inside it; `sandbox_jail.py` the OS sandbox the worker enters
before running agent code: namespaces, a read-only root with only the standard library, its own
uid, seccomp, rlimits). `run(code, handler)` sends one cell, answers the worker's API
calls with `handler(app, api, kwargs)` -- which runs here, in the trainer, where the world lives --
and returns a `CellResult`. It never raises and never hangs for anything the worker does:

- everything the worker sends is untrusted: every frame is size-capped, parsed with bounded
  nesting and type-checked; anything else kills the worker and becomes an error observation;
- every read and write has a deadline (a full pipe cannot block the trainer);
- printed output and error text are capped together (`output_chars`) and made valid UTF-8;
- one API call's arguments are capped (`call_argument_chars`), and so are all of an episode's
  (`episode_argument_chars`): the agent gets a clear ApiError past either.

When a worker dies, times out or breaks the protocol it is killed (SIGKILL to its process group)
and a fresh one takes its place. Variables are restored by REPLAYING the episode's earlier cells
that finished, at the start of the NEXT cell, under a budget of its own (`replay_budget`: the
replayed cells' recorded run times, times REPLAY_SLOWDOWN, plus REPLAY_MARGIN_S, at most
REPLAY_CAP_S); the next cell's `time_limit_s` starts after the replay, so slow earlier cells never
use up the time of the cell that follows a crash. During the replay the API calls are NOT sent to
the world again; they are answered from the log recorded when the cell first ran, so the world's
state is untouched. If a replayed cell asks for a different call than the log holds, replay stops
there and the cell's output says which variables may be missing. If the replay fails or runs past
its budget, the sandbox cannot restore the episode: the cell is not run, its result carries
`failure` (an environment failure, not the agent's), and every later cell gets the same until
`reset()`.

Where the OS sandbox cannot be set up (no user namespaces, no libseccomp, not Linux) `Sandbox()`
raises `SandboxUnavailable` with the reason, unless the caller accepts the risk with
`SandboxLimits(unsafe_no_os_sandbox=True)` or the environment variable
`LOOPJAX_UNSAFE_NO_OS_SANDBOX=1` (then only rlimits and the Python-level checks stand).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# SandboxLimits and WORKER are imported from here by callers (miniworld, tests) too.
from loopjax.envs.sandbox_process import (
    WORKER,  # noqa: F401 (re-exported, see above)
    SandboxLimits,
    WorkerGone,
    WorkerProcess,
    clean_text,
)

Handler = Callable[[str, str, dict], Any]
UNSAFE_ENV = "LOOPJAX_UNSAFE_NO_OS_SANDBOX"
MAX_DEPTH = 32         # nesting of any JSON value a worker sends
MAX_NAME_CHARS = 200   # app and api names
REPLAY_SLOWDOWN = 2.0  # a replayed cell may take this many times its recorded run time
REPLAY_MARGIN_S = 1.0  # plus this, in all (a fresh worker's first imports, a loaded machine)
REPLAY_CAP_S = 60.0    # and a replay never takes longer than this


def replay_budget(seconds: list[float]) -> float:
    """The wall-clock budget of a replay of cells that first ran for `seconds`."""
    return min(REPLAY_SLOWDOWN * sum(seconds) + REPLAY_MARGIN_S, REPLAY_CAP_S)


class HandlerError(Exception):
    """What a handler raises to make the agent see an ApiError with this message."""


class SandboxUnavailable(RuntimeError):
    """The OS cannot sandbox agent code here (and the risk was not accepted)."""


@dataclasses.dataclass
class CellResult:
    """The outcome of one cell: printed output, error text (or None), whether the worker died;
    `failure` says why the sandbox could not go on with the episode (the cell did not run)."""

    output: str
    error: str | None
    crashed: bool = False
    calls: list = dataclasses.field(default_factory=list)
    failure: str | None = None

    def observation(self) -> str:
        """The text an agent sees: output, then the error (if any)."""
        parts = [p for p in (self.output.rstrip("\n"), self.error and self.error.rstrip("\n")) if p]
        return "\n".join(parts) if parts else "Execution successful."


def cap_texts(output: str, error: str | None, limit: int) -> tuple[str, str | None]:
    """Output and error together within about `limit` characters, both made valid UTF-8."""
    if error is not None:
        room = max(limit // 4, limit - len(output))
        if len(error) > room:  # keep the head and the tail (the exception line)
            half = room // 2
            error = error[:half] + "\n[... error text cut ...]\n" + error[-half:]
        error = clean_text(error)
    room = limit - (len(error) if error else 0)
    if len(output) > room:
        output = output[:max(room, 0)] + f"\n[output truncated at {limit} characters]"
    return clean_text(output), error


def json_depth_ok(value, max_depth: int = MAX_DEPTH) -> bool:
    """Whether a parsed JSON value nests at most max_depth containers (iterative)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > max_depth:
                return False
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            if d > max_depth:
                return False
            stack.extend((x, d + 1) for x in v)
    return True


_probe_lock = threading.Lock()
_probe_result: dict[str, str | None] = {}


def os_sandbox_problem() -> str | None:
    """None if workers can enter the OS sandbox here, else why not (checked once per process)."""
    with _probe_lock:
        if sys.executable not in _probe_result:
            if not sys.platform.startswith("linux"):
                problem = f"the OS sandbox needs Linux (this is {sys.platform})"
            else:
                worker = WorkerProcess(SandboxLimits(startup_s=60.0))
                try:
                    worker.wait_ready()
                    problem = None
                except WorkerGone as gone:
                    problem = worker.refused or str(gone)
                finally:
                    worker.kill()
            _probe_result[sys.executable] = problem
        return _probe_result[sys.executable]


def unsafe_accepted(limits: SandboxLimits) -> bool:
    return limits.unsafe_no_os_sandbox or os.environ.get(UNSAFE_ENV, "") not in ("", "0")


class Sandbox:
    """A persistent REPL in a worker process; API calls are answered by `handler` in this process.

    A spare worker is started in the background so that `reset()` does not wait for a start-up.
    """

    def __init__(self, limits: SandboxLimits | None = None):
        limits = limits or SandboxLimits()
        if unsafe_accepted(limits):
            limits = dataclasses.replace(limits, unsafe_no_os_sandbox=True)
        else:
            problem = os_sandbox_problem()
            if problem:
                raise SandboxUnavailable(
                    f"agent code cannot be sandboxed on this machine: {problem}.\nloopjax runs "
                    "agent code only inside an OS sandbox (Linux user/mount/PID/network "
                    "namespaces, seccomp through libseccomp). Fix the cause (e.g. enable user "
                    "namespaces: sysctl kernel.unprivileged_userns_clone=1; install libseccomp2), "
                    f"or accept the risk of running model-written code unsandboxed with "
                    f"{UNSAFE_ENV}=1 or SandboxLimits(unsafe_no_os_sandbox=True).")
        self.limits = limits
        self._worker: WorkerProcess | None = None
        self._spare: WorkerProcess | None = None
        self.history: list[tuple[str, list, float]] = []  # (code, call log, s) of finished cells
        self._replay: list[tuple[str, list, float]] = []  # to replay before the next cell runs
        self.argument_chars = 0  # API-call arguments sent this episode
        self.failure: str | None = None  # why the episode cannot go on (a failed replay)

    def reset(self) -> None:
        """Forget all variables: switch to a fresh worker."""
        if self._worker is not None:
            self._worker.kill()
        self._worker = self._spare or WorkerProcess(self.limits)
        self._spare = WorkerProcess(self.limits)
        self.history, self._replay, self.argument_chars, self.failure = [], [], 0, None

    def close(self) -> None:
        for w in (self._worker, self._spare):
            if w is not None:
                w.kill()
        self._worker = self._spare = None

    def _fresh_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
        self._worker = self._spare or WorkerProcess(self.limits)
        self._spare = WorkerProcess(self.limits)

    def run(self, code: str, handler: Handler) -> CellResult:
        """Run one cell. Never raises and never hangs for anything the agent's code does."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if self._worker is None:
            self.reset()
        if self.failure is not None:
            return CellResult("", f"SandboxError: {self.failure}", crashed=True,
                              failure=self.failure)
        calls: list = []
        try:
            self._worker.wait_ready()  # start-up is not the cell's time
        except WorkerGone as gone:
            self._fresh_worker()
            return CellResult("", f"SandboxError: {gone}; try again.", crashed=True)
        note = self._restore() if self._replay else ""
        if self.failure is not None:
            return CellResult("", f"SandboxError: {self.failure}", crashed=True,
                              failure=self.failure)
        start = time.monotonic()
        deadline = start + self.limits.time_limit_s  # the cell's own time, after any replay

        def logged(app, api, kwargs, size):
            entry = {"app": app, "api": api, "kwargs": kwargs, "ok": False}
            if size > self.limits.call_argument_chars:
                entry["error"] = (f"the arguments of apis.{app}.{api} are too large ({size} > "
                                  f"{self.limits.call_argument_chars} characters as JSON)")
            elif self.argument_chars + size > self.limits.episode_argument_chars:
                entry["error"] = (f"this episode's API calls have sent more than "
                                  f"{self.limits.episode_argument_chars} characters of arguments;"
                                  " no further calls are accepted")
            else:
                self.argument_chars += size
                try:
                    entry.update(ok=True, value=handler(app, api, kwargs))
                except HandlerError as e:
                    entry["error"] = clean_text(str(e))[:self.limits.output_chars]
                except Exception as e:  # noqa: BLE001  a handler bug must not crash the trainer
                    entry["error"] = f"internal error ({type(e).__name__}) in {app}.{api}"
            calls.append(entry)
            return entry

        try:
            output, error = self._exec(code, logged, deadline)
        except WorkerGone as gone:
            self._replay, self.history = self.history, []
            self._fresh_worker()
            msg = (f"{gone}.\nThe worker was restarted; variables from earlier cells are "
                   "restored by replaying them before your next cell runs.")
            return CellResult(note, msg if self._replay else f"{gone}.\nThe worker was "
                              "restarted.", crashed=True, calls=calls)
        except Exception as e:  # noqa: BLE001  a bug here must not take the trainer down
            self._worker.kill()
            self._replay, self.history = self.history, []
            self._fresh_worker()
            return CellResult(note, f"SandboxError: {type(e).__name__}", crashed=True, calls=calls)
        self.history.append((code, calls, time.monotonic() - start))
        output, error = cap_texts(note + output, error, self.limits.output_chars)
        return CellResult(output, error, calls=calls)

    def _exec(self, code: str, logged: Callable, deadline: float) -> tuple[str, str | None]:
        worker = self._worker
        try:
            worker.cells += 1
            worker.send({"op": "exec", "code": code, "cell": worker.cells}, deadline)
            while True:
                msg, size = worker.recv(deadline)
                op = msg["op"]
                if op == "done":
                    output, error = msg.get("output"), msg.get("error")
                    if (not isinstance(output, str) or not (error is None or isinstance(error, str))
                            or msg.get("cell") != worker.cells):
                        raise WorkerGone("protocol violation: a malformed done message")
                    return cap_texts(output, error, self.limits.output_chars)
                app, api, kwargs = msg.get("app"), msg.get("api"), msg.get("kwargs")
                if (op != "call" or not isinstance(app, str) or not isinstance(api, str)
                        or len(app) > MAX_NAME_CHARS or len(api) > MAX_NAME_CHARS
                        or not isinstance(kwargs, dict) or not json_depth_ok(kwargs)):
                    raise WorkerGone("protocol violation: an unexpected message")
                entry = logged(app, api, kwargs, size)
                reply = {"op": "result", "ok": entry["ok"], "value": entry.get("value"),
                         "error": entry.get("error")}
                worker.send(reply, deadline)
        except WorkerGone as gone:
            worker.kill()
            if str(gone) == "timeout":
                raise WorkerGone(f"TimeoutError: the cell ran past the {self.limits.time_limit_s:g}"
                                 " s limit and was stopped") from None
            raise

    def _restore(self) -> str:
        """Replay the cells of a crashed worker within their own budget (`replay_budget`); a
        note if a replay diverged. A replay that fails or runs past its budget sets `failure`."""
        replay, self._replay = self._replay, []
        ran = sum(seconds for _, _, seconds in replay)
        budget = replay_budget([seconds for _, _, seconds in replay])
        deadline = time.monotonic() + budget
        for i, (code, log, seconds) in enumerate(replay):
            replayer = _Replayer(log)
            try:
                self._exec(code, replayer, deadline)
            except WorkerGone as gone:
                self._fresh_worker()
                why = (f"it ran past its {budget:.1f} s budget (the {len(replay)} cell(s) took "
                       f"{ran:.1f} s when they first ran)" if time.monotonic() >= deadline
                       else str(gone).splitlines()[0])
                self.failure = (f"the worker restarted, and replaying the episode's earlier cells "
                                f"to restore their variables failed in cell {i + 1}: {why}; the "
                                "episode cannot go on")
                return ""
            self.history.append((code, log, seconds))
            if replayer.diverged:
                return (f"[the worker restarted; variables were restored up to cell {i + 1} "
                        "(its replay diverged from the recorded API calls)]\n")
        return ""


class _Replayer:
    """Answers a replayed cell's API calls from its recorded log, in order."""

    def __init__(self, log: list):
        self.log, self.i, self.diverged = log, 0, False

    def __call__(self, app, api, kwargs, size=0):
        if self.i < len(self.log):
            entry = self.log[self.i]
            if (entry["app"], entry["api"], entry["kwargs"]) == (app, api, kwargs):
                self.i += 1
                return entry
        self.diverged = True
        return {"ok": False, "error": "replay diverged from the recorded API calls"}

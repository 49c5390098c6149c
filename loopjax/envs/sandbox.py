"""Run agent code in a separate, locked-down worker process (the trainer side of the sandbox).

`Sandbox(handler)` owns one worker process (see `sandbox_worker.py` for what the worker locks
down before running agent code). `run(code)` sends one cell, answers the worker's API calls with
`handler(app, api, kwargs)` -- which runs here, in the trainer, where the world lives -- and
returns a `CellResult` within `time_limit_s` of wall-clock time.

When a worker dies or times out it is killed (SIGKILL to its process group) and a fresh one is
started. Variables are restored by REPLAYING the episode's earlier cells that finished (with or
without an exception) in the fresh worker: during the replay the API calls are NOT sent to the
world again; they are answered from the log recorded when the cell first ran, so the world's state
is untouched. If a replayed cell asks for a different call than the log holds, or the replay
itself fails, replay stops there and the cell's result says which variables may be missing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Callable

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")
Handler = Callable[[str, str, dict], Any]


class HandlerError(Exception):
    """What a handler raises to make the agent see an ApiError with this message."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-worker limits. Wall-clock time is enforced here; the rest inside the worker."""

    time_limit_s: float = 10.0     # wall clock per cell; past it the worker is SIGKILLed
    cpu_per_cell_s: float = 10.0   # RLIMIT_CPU budget per cell (SIGXCPU kills the worker)
    cpu_total_s: int = 600         # RLIMIT_CPU hard limit for the worker's whole life
    memory_mb: int = 512           # RLIMIT_AS
    output_chars: int = 20_000     # printed output kept per cell; the rest is cut
    recursion_limit: int = 500


@dataclasses.dataclass
class CellResult:
    """The outcome of one cell: printed output, error text (or None), whether the worker died."""

    output: str
    error: str | None
    crashed: bool = False
    calls: list = dataclasses.field(default_factory=list)

    def observation(self) -> str:
        """The text an agent sees: output, then the error (if any)."""
        parts = [p for p in (self.output.rstrip("\n"), self.error and self.error.rstrip("\n")) if p]
        return "\n".join(parts) if parts else "Execution successful."


class WorkerGone(Exception):
    """The worker died, timed out or broke the protocol."""


class _Worker:
    """One worker process and its framed JSON pipe."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", WORKER, json.dumps(dataclasses.asdict(limits))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={}, cwd="/", close_fds=True, start_new_session=True)
        self.ready = False
        self.max_msg = 4 * limits.output_chars + 2 ** 20

    def send(self, msg: dict) -> None:
        body = json.dumps(msg).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(body)) + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise WorkerGone("the worker process died") from e

    def _read(self, n: int, deadline: float) -> bytes:
        fd, buf = self.proc.stdout.fileno(), b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerGone("timeout")
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise WorkerGone("the worker process died")
            buf += chunk
        return buf

    def recv(self, deadline: float) -> dict:
        (n,) = struct.unpack(">I", self._read(4, deadline))
        if n > self.max_msg:
            raise WorkerGone(f"protocol violation: {n}-byte message")
        try:
            msg = json.loads(self._read(n, deadline))
        except ValueError as e:
            raise WorkerGone("protocol violation: bad JSON") from e
        if not isinstance(msg, dict):
            raise WorkerGone("protocol violation: not an object")
        return msg

    def wait_ready(self, deadline: float) -> None:
        if not self.ready:
            if self.recv(deadline).get("op") != "ready":
                raise WorkerGone("the worker failed to start")
            self.ready = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Sandbox:
    """A persistent REPL in a worker process; API calls are answered by `handler` in this process.

    A spare worker is started in the background so that `reset()` does not wait for a start-up.
    """

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._worker: _Worker | None = None
        self._spare: _Worker | None = None
        self.history: list[tuple[str, list]] = []  # (code, call log) of finished cells

    def reset(self) -> None:
        """Forget all variables: switch to a fresh worker."""
        if self._worker is not None:
            self._worker.kill()
        self._worker = self._spare or _Worker(self.limits)
        self._spare = _Worker(self.limits)
        self.history = []

    def close(self) -> None:
        for w in (self._worker, self._spare):
            if w is not None:
                w.kill()
        self._worker = self._spare = None

    def run(self, code: str, handler: Handler) -> CellResult:
        """Run one cell. Never raises for anything the agent's code does."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if self._worker is None:
            self.reset()
        calls: list = []

        def logged(app, api, kwargs):
            try:
                entry = {"app": app, "api": api, "kwargs": kwargs, "ok": True,
                         "value": handler(app, api, kwargs)}
            except HandlerError as e:
                entry = {"app": app, "api": api, "kwargs": kwargs, "ok": False, "error": str(e)}
            calls.append(entry)
            return entry

        try:
            output, error = self._exec(code, logged)
        except WorkerGone as gone:
            return CellResult("", self._recover(str(gone)), crashed=True, calls=calls)
        self.history.append((code, calls))
        return CellResult(output, error, calls=calls)

    def _exec(self, code: str, logged: Callable) -> tuple[str, str | None]:
        worker = self._worker
        deadline = time.monotonic() + self.limits.time_limit_s
        try:
            worker.wait_ready(time.monotonic() + 30.0)  # start-up is not the cell's time
            deadline = time.monotonic() + self.limits.time_limit_s
            worker.send({"op": "exec", "code": code})
            while True:
                msg = worker.recv(deadline)
                if msg.get("op") == "done":
                    return str(msg.get("output", "")), msg.get("error")
                if msg.get("op") != "call" or not isinstance(msg.get("kwargs"), dict):
                    raise WorkerGone("protocol violation: unexpected message")
                entry = logged(str(msg.get("app")), str(msg.get("api")), msg["kwargs"])
                worker.send({"op": "result", "ok": entry["ok"],
                             "value": entry.get("value"), "error": entry.get("error")})
        except WorkerGone as gone:
            worker.kill()
            if str(gone) == "timeout":
                raise WorkerGone(f"TimeoutError: the cell ran past the {self.limits.time_limit_s:g}"
                                 " s limit and was stopped") from None
            raise

    def _recover(self, reason: str) -> str:
        """Start a fresh worker and replay the finished cells; say what happened."""
        history = self.history
        self._worker.kill()
        self._worker = self._spare or _Worker(self.limits)
        self._spare = _Worker(self.limits)
        self.history = []
        for i, (code, log) in enumerate(history):
            replayer = _Replayer(log)
            try:
                self._exec(code, replayer)
            except WorkerGone:
                self._worker.kill()
                self._worker, self._spare = self._spare, _Worker(self.limits)
                return (f"{reason}.\nThe worker was restarted; variables from cells "
                        f"{i + 1}.. could not be restored (replay failed).")
            self.history.append((code, log))
            if replayer.diverged:
                return (f"{reason}.\nThe worker was restarted; variables were restored up to "
                        f"cell {i + 1} (its replay diverged from the recorded API calls).")
        return (f"{reason}.\nThe worker was restarted and variables from earlier cells were "
                "restored.")


class _Replayer:
    """Answers a replayed cell's API calls from its recorded log, in order."""

    def __init__(self, log: list):
        self.log, self.i, self.diverged = log, 0, False

    def __call__(self, app, api, kwargs):
        if self.i < len(self.log):
            entry = self.log[self.i]
            if (entry["app"], entry["api"], entry["kwargs"]) == (app, api, kwargs):
                self.i += 1
                return entry
        self.diverged = True
        return {"ok": False, "error": "replay diverged from the recorded API calls"}

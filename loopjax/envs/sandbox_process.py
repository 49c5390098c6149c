"""The trainer's handle on one sandbox worker process: start it, talk to it, kill it.

`WorkerProcess(limits)` starts `python -I -S -B sandbox_worker.py '<limits json>'` (a file path:
the worker must not import the loopjax package, see `sandbox_worker.py`) in its own session, and
speaks its protocol: 4-byte big-endian length + UTF-8 JSON frames over the worker's stdin/stdout.
Every read and write has a deadline and every frame the worker sends is untrusted: size-capped,
parsed without NaN/Infinity, and required to be a dict with a string "op"; anything else raises
`WorkerGone`. What the frames mean is `loopjax.envs.sandbox`'s business.
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

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-worker limits. Wall-clock time is enforced here; the rest inside the worker."""

    time_limit_s: float = 10.0     # wall clock per cell (a replay has its own budget); past it:
                                   # SIGKILL
    cpu_per_cell_s: float = 10.0   # RLIMIT_CPU budget per cell (SIGXCPU kills the worker)
    cpu_total_s: int = 600         # RLIMIT_CPU hard limit for the worker's whole life
    memory_mb: int = 512           # RLIMIT_AS
    output_chars: int = 20_000     # printed output + error text kept per cell; the rest is cut
    recursion_limit: int = 500
    call_argument_chars: int = 20_000        # one API call's keyword arguments, as JSON
    episode_argument_chars: int = 1_000_000  # all API calls' arguments in one episode
    startup_s: float = 30.0        # a worker's start-up (not agent time); past it: an error
    unsafe_no_os_sandbox: bool = False  # run without the OS sandbox: accepts the risk
    python_checks: bool = True     # False: no AST check, full builtins (tests of the OS boundary)


class WorkerGone(Exception):
    """The worker died, timed out or broke the protocol."""


def clean_text(text: str) -> str:
    """Valid UTF-8 (lone surrogates become '?'), no NUL characters."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\x00")


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


class WorkerProcess:
    """One worker process and its framed JSON pipe (non-blocking, every wait with a deadline)."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", WORKER, json.dumps(dataclasses.asdict(limits))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={}, cwd="/", close_fds=True, start_new_session=True)
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        self.ready = False
        self.cells = 0  # cells sent; a done message names its cell
        # A done frame of output_chars characters, each escaped as a surrogate pair, plus room.
        self.max_msg = 24 * limits.output_chars + 2 * limits.call_argument_chars + 2 ** 16
        self.refused: str | None = None

    def send(self, msg: dict, deadline: float) -> None:
        body = json.dumps(msg).encode()
        data = memoryview(struct.pack(">I", len(body)) + body)
        while data:
            try:
                data = data[os.write(self.wfd, data):]
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, OSError, ValueError) as e:
                raise WorkerGone("the worker process died") from e
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.wfd], [], left)[1]:
                raise WorkerGone("timeout")

    def _read(self, n: int, deadline: float) -> bytes:
        fd, buf = self.rfd, b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerGone("timeout")
            try:
                chunk = os.read(fd, n - len(buf))
            except OSError as e:
                raise WorkerGone("the worker process died") from e
            if not chunk:
                raise WorkerGone("the worker process died")
            buf += chunk
        return buf

    def recv(self, deadline: float) -> tuple[dict, int]:
        """The next frame as a dict with a string "op", and its size in bytes."""
        (n,) = struct.unpack(">I", self._read(4, deadline))
        if n > self.max_msg:
            raise WorkerGone(f"protocol violation: a {n}-byte message")
        try:
            msg = json.loads(self._read(n, deadline).decode("utf-8"),
                             parse_constant=_reject_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise WorkerGone("protocol violation: a malformed message") from e
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise WorkerGone("protocol violation: not a message")
        return msg, n

    def wait_ready(self) -> None:
        """Wait (at most startup_s) for the worker's first frame: ready or refused."""
        if self.ready:
            return
        try:
            msg, _ = self.recv(time.monotonic() + self.limits.startup_s)
        except WorkerGone as gone:
            raise WorkerGone(f"the worker failed to start ({gone})") from None
        if msg["op"] == "refused":
            self.refused = clean_text(str(msg.get("reason", "")))[:2000]
            raise WorkerGone(f"the OS sandbox could not be set up: {self.refused}")
        if msg["op"] != "ready":
            raise WorkerGone("the worker failed to start")
        self.ready = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

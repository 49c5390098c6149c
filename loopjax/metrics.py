"""Run-folder metrics: a JSON-lines log, TensorBoard scalars, a progress bar and a phase timer.

`MetricsWriter` is what the trainer calls once per iteration. `metrics.jsonl` is the source of
truth (report.py draws from it); TensorBoard events are a convenience and are dropped, with one
warning, when tensorboardX is missing. Only JAX process 0 should write: pass `enabled=False`
elsewhere so the call sites need no `if`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "events"


def _json_value(value: Any) -> Any:
    """Numbers as Python floats/ints, NaN and inf as None (JSON has no NaN), the rest as-is."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if (isinstance(value, (float, np.floating))
            or (isinstance(value, np.ndarray) and value.ndim == 0)):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # jax scalars
        return _json_value(value.item())
    return value


def _scalar(value: Any) -> float | None:
    """The float TensorBoard gets, or None for strings and other non-numbers."""
    value = _json_value(value)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log; a missing file is empty, a torn last line (written when
    the process died) is skipped, any other bad line is an error."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number >= len(lines) - 2:
                continue
            raise ValueError(f"{path}:{number + 1} is not valid JSON: {line[:80]!r}") from err
    return records


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replaces a JSON-lines log by `records`, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends `{"step", "time", **metrics}` lines to run_dir/metrics.jsonl and scalars to
    run_dir/events/."""

    _warned_no_tensorboard = False  # warn once per process, not once per run

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, METRICS_FILE)
        # So that a resumed run does not glue its first line onto a crash's half line.
        _drop_torn_tail(path)
        self._file = open(path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            if not MetricsWriter._warned_no_tensorboard:
                warnings.warn("tensorboardX is not importable: writing metrics.jsonl only",
                              stacklevel=1)
                MetricsWriter._warned_no_tensorboard = True
        else:
            self._tb = SummaryWriter(logdir=os.path.join(self.run_dir, EVENTS_DIR))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Logs one record; `prefix` (e.g. "eval/dev/") is prepended to every key."""
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError("MetricsWriter is closed; open a new one to keep writing")
        named = {f"{prefix}{key}": value for key, value in metrics.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({key: _json_value(value) for key, value in named.items()})
        # allow_nan=False turns a NaN that slipped past _json_value into an error, not invalid JSON.
        self._file.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in named.items():
                scalar = _scalar(value)
                if scalar is not None:
                    self._tb.add_scalar(key, scalar, global_step=int(step))
            self._tb.flush()

    @staticmethod
    def read(run_dir: str | os.PathLike) -> list[dict]:
        """All records of run_dir/metrics.jsonl (read_jsonl)."""
        return read_jsonl(os.path.join(os.fspath(run_dir), METRICS_FILE))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: str) -> None:
    """Cuts a trailing partial line (no newline at the end) left by a crash."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


class _LogLines:
    """tqdm's interface for non-TTY stderr: a plain line at most every `interval` seconds."""

    def __init__(self, iterable, total, desc, interval):
        self.iterable, self.total, self.desc, self.interval = iterable, total, desc, interval
        self.n = 0
        self._start = self._last = time.monotonic()

    def _log(self, final=False):
        elapsed = time.monotonic() - self._start
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        end = " done" if final else ""
        print(f"{self.desc}: {self.n}{of} [{elapsed:.0f}s, {rate:.2f}/s]{end}", file=sys.stderr,
              flush=True)
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._log()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def close(self) -> None:
        if self.n and self._last != float("inf"):
            self._log(final=True)
        self._last = float("inf")  # close once

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(_LogLines):
    def _log(self, final=False):
        self._last = time.monotonic()


def progress(iterable_or_total: Iterable | int, desc: str, enabled: bool = True,
             interval: float = 5.0):
    """A tqdm bar on a TTY; on CI logs, a plain line at most every `interval` seconds.

    Pass an iterable to wrap it, or an int total and call `.update(n)` yourself (also usable as a
    context manager). `enabled=False` (non-zero processes) prints nothing.
    """
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable = iterable_or_total
        total = len(iterable) if hasattr(iterable, "__len__") else None
    if not enabled:
        return _Silent(iterable, total, desc, interval)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, mininterval=0.5)
    return _LogLines(iterable, total, desc, interval)


class Timer:
    """Wall time per named phase: `with timer("generate"): ...`; `shares()` for the metrics line."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[types.SimpleNamespace]:
        """Times the block; what it yields holds the block's `seconds` once it ends."""
        span, start = types.SimpleNamespace(seconds=0.0), time.perf_counter()
        try:
            yield span
        finally:
            span.seconds = time.perf_counter() - start
            self.totals[phase] += span.seconds

    def shares(self) -> dict[str, float]:
        """{"time/<phase>_share": fraction of all phases, "time/<phase>_s": seconds,
        "time/total_s"}."""
        total = sum(self.totals.values())
        out = {}
        for phase, seconds in self.totals.items():
            out[f"time/{phase}_share"] = seconds / total if total > 0 else 0.0
            out[f"time/{phase}_s"] = seconds
        out["time/total_s"] = total
        return out

    def reset(self) -> None:
        self.totals.clear()

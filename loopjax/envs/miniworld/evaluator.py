"""AppWorld-style evaluation: unit tests over the final state.

A task's tests are (1) its own checks of the required changes, (2) the answer given to
`complete_task` (question tasks) or that `complete_task` was called (action tasks), and (3) NO
collateral change: every difference between the initial and the final state -- a diff of the
whole state, all apps, all tables, all records -- must be matched by one of the task's `Allow`
rules. reward = passed / total; success = all passed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Change:
    """One record-level difference: kind is "add", "update" or "delete"."""

    app: str
    table: str
    record_id: Any
    kind: str
    before: dict | None
    after: dict | None


@dataclasses.dataclass(frozen=True)
class Allow:
    """Changes of `kinds` to app.table are allowed where `where(record)` holds, to at most
    `limit` records (None: any number).

    `where` sees the record after the change (add / update) or before it (delete). The limit is
    what stops spraying: a task that asks for one message to a contact allows one, so texting
    every candidate phrase leaves all but one as collateral changes.
    """

    app: str
    table: str
    kinds: tuple[str, ...] = ("add",)
    where: Callable[[dict], bool] | None = None
    limit: int | None = 1

    def permits(self, c: Change) -> bool:
        record = c.before if c.kind == "delete" else c.after
        return ((c.app, c.table) == (self.app, self.table) and c.kind in self.kinds
                and (self.where is None or bool(self.where(record))))


def diff(initial: dict, final: dict) -> list[Change]:
    """Every record added, deleted or changed between two states, in a stable order."""
    out = []
    for app in sorted(set(initial) | set(final)):
        a, b = initial.get(app, {}), final.get(app, {})
        for table in sorted(set(a) | set(b)):
            ta, tb = a.get(table, {}), b.get(table, {})
            for rid in sorted(set(ta) | set(tb), key=repr):
                before, after = ta.get(rid), tb.get(rid)
                if before == after:
                    continue
                kind = "add" if before is None else "delete" if after is None else "update"
                out.append(Change(app, table, rid, kind, before, after))
    return out


class Outcome:
    """What a task's checks look at: the states, their diff and the supervisor's answer."""

    def __init__(self, initial: dict, final: dict, answer: Any, completed: bool):
        self.initial, self.final = initial, final
        self.answer, self.completed = answer, completed
        self.changes = diff(initial, final)

    def added(self, app: str, table: str) -> list[dict]:
        return [c.after for c in self.changes
                if (c.app, c.table, c.kind) == (app, table, "add")]

    def updated(self, app: str, table: str) -> list[tuple[dict, dict]]:
        return [(c.before, c.after) for c in self.changes
                if (c.app, c.table, c.kind) == (app, table, "update")]

    def deleted(self, app: str, table: str) -> list[dict]:
        return [c.before for c in self.changes
                if (c.app, c.table, c.kind) == (app, table, "delete")]

    def record(self, app: str, table: str, record_id: Any) -> dict | None:
        return self.final.get(app, {}).get(table, {}).get(record_id)


def norm(value: Any) -> Any:
    """Normalize an answer or field for comparison: numbers as floats, text folded."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 2)
    if isinstance(value, str):
        text = " ".join(value.strip().lower().split()).rstrip(".")
        try:
            return round(float(text.lstrip("$").replace(",", "")), 2)
        except ValueError:
            return text
    if isinstance(value, (list, tuple)):
        return sorted((norm(v) for v in value), key=repr)
    return value


def same(a: Any, b: Any) -> bool:
    return norm(a) == norm(b)


def _collateral(changes: list[Change], allow: list[Allow]) -> list[Change]:
    """Changes no rule permits, each rule permitting at most its `limit` of them (in order)."""
    used = [0] * len(allow)
    out = []
    for c in changes:
        for i, a in enumerate(allow):
            if (a.limit is None or used[i] < a.limit) and a.permits(c):
                used[i] += 1
                break
        else:
            out.append(c)
    return out


def run_tests(checks: list, allow: list[Allow], answer: Any, outcome: Outcome):
    """Run every test; return (num_tests, passes, failures) with failures as readable strings."""
    tests = list(checks)
    if answer is None:
        tests.append(("complete_task was called", lambda o: o.completed))
    else:
        tests.append((f"the answer is {answer!r}",
                      lambda o: o.completed and same(o.answer, answer)))
    collateral = _collateral(outcome.changes, allow)
    tests.append(("no collateral changes" + (f" (unexpected: {collateral[0].kind} "
                  f"{collateral[0].app}.{collateral[0].table} #{collateral[0].record_id})"
                  if collateral else ""), lambda o: not collateral))
    passes, failures = [], []
    for name, fn in tests:
        try:
            ok = bool(fn(outcome))
        except Exception as e:  # a check crashing on odd agent data is a failed check
            ok, name = False, f"{name} (check raised {type(e).__name__})"
        (passes if ok else failures).append(name)
    return len(tests), passes, failures

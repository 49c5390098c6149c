"""The paper's behaviour measures, read from the code an episode ran in AppWorld's API vocabulary
(`apis.api_docs.*`, `page_index`, `apis.supervisor.complete_task(answer=...)`), which miniworld
mirrors: the `WorldEntry.behaviour` hook that miniworld's and AppWorld's registry entries share.

    entry = WorldEntry(..., behaviour=api_behaviour(ground_truth))
    entry.behaviour(record)  # {"doc_lookups": 1.0, "answered_without_lookup": 0.0, ...}
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from loopjax.envs.base import EpisodeRecord, Turn, shows_error

# A call of an app API that reads or changes the state (not the supervisor's, not the docs').
_STATE_CALL_RE = re.compile(r"apis\.(?!supervisor\.|api_docs\.)\w+\.\w+\(")


def code_habits(turns: Sequence[Turn]) -> dict:
    """API-doc lookups of one episode, whether it walked pages of a list (`page_index`), and
    whether it answered (`complete_task(answer=...)`) before any app API call read the state."""
    doc_lookups, looked, blind_answer = 0, False, False
    for t in turns:
        doc_lookups += t.code.count("api_docs.")
        at = t.code.find("complete_task(answer=")
        if at >= 0 and not looked and not _STATE_CALL_RE.search(t.code[:at]):
            blind_answer = True
        looked = looked or bool(_STATE_CALL_RE.search(t.code))
    return {"doc_lookups": doc_lookups, "paginated": any("page_index" in t.code for t in turns),
            "answered_without_lookup": blind_answer}


# Any API call, and a doc lookup of one API (app and API name, keyword or positional).
_CALL_RE = re.compile(r"apis\.(\w+)\.(\w+)\(")
_DOC_RE = re.compile(r"show_api_doc\(\s*(?:app_name\s*=\s*)?['\"](\w+)['\"]\s*,\s*"
                     r"(?:api_name\s*=\s*)?['\"](\w+)['\"]")


def call_order(turns: Sequence[Turn]) -> dict:
    """How an episode's app API calls (not the supervisor's or the docs') relate to what came
    before them, in the order the code names them: the share of the APIs it called whose
    `show_api_doc` came first (None: it called none), the apps it logged into in a turn that did
    not raise before any other call of that app, and whether a turn without an error followed
    its first turn that raised (None: none raised)."""
    documented, called, logged_in, used = set(), {}, set(), set()
    for t in turns:
        events = sorted([*_DOC_RE.finditer(t.code), *_CALL_RE.finditer(t.code)],
                        key=lambda m: m.start())
        for m in events:
            app, api = m.groups()
            if m.re is _DOC_RE:
                documented.add((app, api))
            if m.re is _DOC_RE or not _STATE_CALL_RE.match(t.code, m.start()) or app in used:
                continue
            called.setdefault((app, api), (app, api) in documented)
            if api == "login" and not shows_error(t.output):
                logged_in.add(app)
            elif api != "login":
                used.add(app)
    first_error = next((i for i, t in enumerate(turns) if shows_error(t.output)), None)
    return {"docs_before_call": (float(sum(called.values()) / len(called)) if called else None),
            "logged_in": logged_in,
            "recovered": (None if first_error is None else any(
                t.code and not shows_error(t.output) for t in turns[first_error + 1:]))}


def api_behaviour(ground_truth: Callable[[str], list[str]] | None
                  ) -> Callable[[EpisodeRecord], dict[str, float]]:
    """The hook of a world whose ground truth (task id -> code per turn; None: none) says which
    tasks need paging and logins: doc lookups and answers without a lookup for every episode;
    whether it paged, for episodes whose task's ground truth walks the pages of a list; whether
    it logged into every app the ground truth logs into (`call_order`), for tasks that need a
    login; the share of its APIs whose docs it read first, for episodes that called one; and
    whether it recovered from a turn that raised, for episodes with one."""

    @functools.cache
    def needs(task_id: str) -> tuple[bool, frozenset[str]]:
        """(whether the task's ground truth walks pages, the apps it logs into)."""
        try:
            code = "" if ground_truth is None else "\n".join(ground_truth(task_id))
        except NotImplementedError:
            code = ""
        return "page_index" in code, frozenset(
            m.group(1) for m in _CALL_RE.finditer(code) if m.group(2) == "login")

    def behaviour(record: EpisodeRecord) -> dict[str, float]:
        habits, order = code_habits(record.turns), call_order(record.turns)
        out = {"doc_lookups": float(habits["doc_lookups"]),
               "answered_without_lookup": float(habits["answered_without_lookup"])}
        pages, logins = needs(record.task_id)
        if pages:
            out["paginate_when_needed"] = float(habits["paginated"])
        if logins:
            out["logins_right"] = float(logins <= order["logged_in"])
        for name in ("docs_before_call", "recovered"):
            if order[name] is not None:
                out[name] = float(order[name])
        return out

    return behaviour

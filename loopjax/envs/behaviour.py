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

from loopjax.envs.base import EpisodeRecord, Turn

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


def api_behaviour(ground_truth: Callable[[str], list[str]] | None
                  ) -> Callable[[EpisodeRecord], dict[str, float]]:
    """The hook of a world whose ground truth (task id -> code per turn; None: none) says which
    tasks need paging: doc lookups and answers without a lookup for every episode, and whether
    it paged only for episodes whose task's ground truth walks the pages of a list."""

    @functools.cache
    def needs_paging(task_id: str) -> bool:
        if ground_truth is None:
            return False
        try:
            return "page_index" in "\n".join(ground_truth(task_id))
        except NotImplementedError:
            return False

    def behaviour(record: EpisodeRecord) -> dict[str, float]:
        habits = code_habits(record.turns)
        out = {"doc_lookups": float(habits["doc_lookups"]),
               "answered_without_lookup": float(habits["answered_without_lookup"])}
        if needs_paging(record.task_id):
            out["paginate_when_needed"] = float(habits["paginated"])
        return out

    return behaviour

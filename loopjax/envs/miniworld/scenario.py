"""Scenario templates: how one task is made from a template, a split and a variant index.

A `Scenario` names its apps and difficulty and has a `make(gen) -> TaskSpec` function. `gen` (a
`Gen`) draws people and values with a task-seeded RNG from the split's pool of people (so dev and
test tasks use people that train tasks never use) and may add task-specific records to the task's
initial state (a note with an amount, a message asking for money...).

Ground-truth solutions are code strings with `@app` markers where an access token goes:
`apis.notes.show_note(@notes note_id=3)`. `render_solution` turns the markers into
`access_token=notes_token, ` and prepends the login lines when the preset uses logins, and drops
them otherwise (miniworld-tiny has no logins, to keep its solutions short).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from typing import Any

from loopjax.envs.miniworld import data
from loopjax.envs.miniworld.evaluator import Allow, Outcome, same

SPLITS = ("train", "dev", "test_normal", "test_challenge")
_POOL = {"train": (0, 1), "dev": (2,), "test_normal": (3,), "test_challenge": (3,)}


@dataclasses.dataclass
class TaskSpec:
    """One task: instruction, ground-truth turns, checks, allowed changes, expected answer."""

    instruction: str
    solution: list[str]
    checks: list[tuple[str, Callable[[Outcome], bool]]]
    allow: list[Allow]
    answer: Any = None  # None = an action task (complete_task() without an answer)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    apps: tuple[str, ...]
    difficulty: int
    make: Callable[[Gen], TaskSpec]
    challenge: bool = False  # True: only in test_challenge (its app combination is unseen in train)


def q(value: Any) -> str:
    """A Python literal for a value in solution code (double-quoted strings)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


class Gen:
    """Task-seeded draws from the split's pool, and set-up edits of the task's initial state."""

    def __init__(self, rng: random.Random, state: dict, people: list[dict], n_contacts: int,
                 split: str, shared_people: bool = False):
        self.rng, self.state, self.people = rng, state, people
        # shared_people: every split draws from the whole population (held-out tasks are then new
        # combinations of people, messages, amounts and notes, never a copy of a train task).
        self.mods = mods = (0, 1, 2, 3) if shared_people else _POOL[split]
        self.contacts = [p for i, p in enumerate(people[1:n_contacts + 1], 1) if i % 4 in mods]
        self.strangers = [p for i, p in enumerate(people) if i > n_contacts and i % 4 in mods]
        self.sup = people[0]

    def contact(self, n: int = 1):
        """One (or n distinct) of the supervisor's contacts from this split's pool."""
        got = self.rng.sample(self.contacts, n)
        return got[0] if n == 1 else got

    def stranger(self) -> dict:
        return self.rng.choice(self.strangers)

    def amount(self, lo: int = 5, hi: int = 95) -> int:
        return self.rng.randrange(lo, hi)

    def phrase(self) -> str:
        return self.rng.choice(data.PHRASES)

    def word(self) -> str:
        return self.rng.choice(data.WORDS)

    def pick(self, seq):
        return self.rng.choice(list(seq))

    def record(self, app: str, table: str, where: Callable[[dict], bool] = lambda r: True):
        """A record of the base state from this split's pool (record id mod 4)."""
        rows = [r for rid, r in sorted(self.state[app][table].items())
                if rid % 4 in self.mods and where(r)]
        return self.rng.choice(rows)

    def add(self, app: str, table: str, id_key: str, **record) -> int:
        """Insert a record into the task's initial state; return its id."""
        rows = self.state[app][table]
        rid = max(rows, default=0) + 1
        rows[rid] = {id_key: rid, **record}
        return rid

    def note(self, title: str, content: str, tag: str = "home") -> int:
        return self.add("notes", "notes", "note_id", title=title, content=content, tags=[tag],
                        pinned=False, updated_at=data.timestamp(1, 30))

    def text_from(self, person: dict, message: str) -> int:
        """A text message from person to the supervisor, newer than every base message."""
        return self.add("phone", "messages", "message_id", sender_name=person["name"],
                        sender_number=person["phone_number"], receiver_name=self.sup["name"],
                        receiver_number=self.sup["phone_number"], message=message,
                        sent_at="2024-05-15T08:00:00")

    def unique_title(self, make: Callable[[], str], app="notes", table="notes", key="title"):
        """A title no record of app.table has yet (searches for it must find exactly one)."""
        taken = {r[key].lower() for r in self.state[app][table].values()}
        for _ in range(100):
            title = make()
            if title.lower() not in taken:
                return title
        raise RuntimeError(f"could not draw a unique {key} for {app}.{table}")


# ---- small check builders: each returns (test name, fn(outcome) -> bool) ---------------------
def added_where(app: str, table: str, what: str, **fields) -> tuple[str, Callable]:
    """A record with these field values was added to app.table."""
    def check(o: Outcome) -> bool:
        return any(all(same(r.get(k), v) for k, v in fields.items()) for r in o.added(app, table))
    return what, check


def deleted_id(app: str, table: str, rid: int, what: str) -> tuple[str, Callable]:
    return what, lambda o: o.record(app, table, rid) is None


def field_is(app: str, table: str, rid: int, field: str, value: Any, what: str):
    return what, lambda o: same((o.record(app, table, rid) or {}).get(field), value)


def only(app: str, table: str, kinds=("add",), **fields) -> Allow:
    """Allow changes to app.table records whose fields equal these values."""
    return Allow(app, table, tuple(kinds),
                 lambda r: all(same(r.get(k), v) for k, v in fields.items()))


# The API names of miniworld's first version. The careless demonstrations of the warm start were
# recorded against it (loopjax.warmstart): code that calls these names today gets a 404 that points
# at the docs, which the careful agents read before they call anything.
V1_NAMES = {("phone", "search_contacts"): "find_contacts", ("phone", "add_contact"): "new_contact",
            ("phone", "send_text_message"): "send_text",
            ("phone", "search_text_messages"): "find_texts",
            ("notes", "search_notes"): "find_notes", ("notes", "create_note"): "add_note",
            ("notes", "delete_note"): "remove_note", ("payments", "show_balance"): "get_balance",
            ("payments", "send_money"): "pay", ("payments", "request_money"): "ask_money",
            ("payments", "search_transactions"): "find_transactions"}
PAGED = "@paged "  # a solution line `@paged x = apis.app.api(...)` needs every page of the list


@dataclasses.dataclass(frozen=True)
class Habits:
    """How an agent writes a solution: the behaviours miniworld's tasks reward.

    lookup: read the used apps' API list (`api_docs`) in a first turn, then call today's API names;
    without it the agent calls the names it remembers from miniworld's first version (V1_NAMES).
    paging: walk every page of a paginated list; without it, take the first page only.
    """
    lookup: bool = True
    paging: bool = True


CAREFUL = Habits()


def render_solution(turns: list[str], auth: bool, username: str, habits: Habits = CAREFUL,
                    api_version: int = 2) -> list[str]:
    """Expand `@app` token markers and `@paged` lines; with auth, log in to the used apps at the
    top of the first solution turn; with habits.lookup, a first turn prints the used apps' APIs.
    api_version=1 writes miniworld's first-version API names (how careless demonstrations read)."""
    code = "\n".join(turns)
    apps = sorted(set(re.findall(r"@(\w+)", code)) - {"paged"})
    out = []
    for t in turns:
        t = "\n".join(_paged(line, habits.paging) if line.startswith(PAGED) else line
                      for line in t.split("\n"))
        for app in apps:
            t = t.replace(f"(@{app})", f"(access_token={app}_token)" if auth else "()")
            t = t.replace(f"(@{app} ", f"(access_token={app}_token, " if auth else "(")
        if api_version == 1:
            for (app, api), old in V1_NAMES.items():
                t = t.replace(f"apis.{app}.{api}(", f"apis.{app}.{old}(")
        out.append(t)
    if auth and apps:
        head = ['pw = {a["account_name"]: a["password"] for a in '
                'apis.supervisor.show_account_passwords()}']
        head += [f'{a}_token = apis.{a}.login(username={q(username)}, '
                 f'password=pw["{a}"])["access_token"]' for a in apps]
        out[0] = "\n".join(head + [out[0]])
    if habits.lookup and apps:
        used = sorted(set(re.findall(r"apis\.(\w+)\.", code)) - {"supervisor", "api_docs"},
                      key=code.index)
        out.insert(0, "\n".join(f"print(apis.api_docs.show_api_descriptions(app_name={q(a)}))"
                                for a in used))
    return out


def _paged(line: str, paging: bool) -> str:
    """`@paged x = apis.a.b(args)` as a loop over every page, or as one call (the first page)."""
    var, call = (s.strip() for s in line[len(PAGED):].split("=", 1))
    if not paging:
        return f"{var} = {call}"
    head, args = call[:-1].split("(", 1)
    args = args + (", " if args.strip() not in ("", "@" + head.split(".")[1]) else " ")
    return (f"{var}, page = [], 0\n"
            f"while got := {head}({args}page_index=page):\n"
            f"    {var}, page = {var} + got, page + 1")

"""Presets, task ids and task construction.

A task id is `"<scenario>.<split>.<k>"`, e.g. `"text_contact.train.3"`; its scenario id is the
part before the first dot. Normal scenarios have variants in train, dev and test_normal (people
drawn from disjoint pools per split, see scenario.Gen); challenge scenarios only in
test_challenge. `build_task(preset, task_id)` gives the task's initial state (the preset's seeded
base state plus the scenario's set-up records) and its TaskSpec; both are deterministic.
"""
from __future__ import annotations

import dataclasses
import functools
import random

from loopjax.envs.miniworld import apps_core, apps_notes_pay, data
from loopjax.envs.miniworld.framework import App
from loopjax.envs.miniworld.scenario import (
    SPLITS,
    Gen,
    Habits,
    Scenario,
    TaskSpec,
    render_solution,
)
from loopjax.envs.miniworld.scenarios_cross import CROSS_SCENARIOS
from loopjax.envs.miniworld.scenarios_full import FULL_SCENARIOS
from loopjax.envs.miniworld.scenarios_tiny import BASIC_SCENARIOS, TINY_SCENARIOS
from loopjax.envs.miniworld.world import copy_state


@dataclasses.dataclass(frozen=True)
class Preset:
    """A world size: which apps, how many people, which scenarios, variants per split."""

    name: str
    apps: tuple[str, ...]              # user apps (supervisor and api_docs are always there)
    scenarios: tuple[Scenario, ...]
    auth: bool                         # APIs need login -> access_token
    n_people: int
    n_contacts: int                    # people[1..n_contacts] are the supervisor's contacts
    variants: tuple[tuple[str, int], ...]  # tasks per scenario in each split
    seed: int = 0
    shared_people: bool = False  # all splits draw from one population; held-out tasks stay distinct
    api_subset: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (app, APIs kept); () = all

    def scenario(self, name: str) -> Scenario:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise ValueError(f"unknown scenario {name!r} in {self.name}; known: "
                         f"{[s.name for s in self.scenarios]}")


def app_registry() -> dict[str, tuple[App, object]]:
    """Every app: (App, data function (rng, people, preset) -> tables)."""
    from loopjax.envs.miniworld import apps_more  # noqa: PLC0415 (the full preset's apps)
    reg = {"phone": (apps_core.PHONE,
                     lambda rng, ppl, pre: apps_core.phone_data(rng, ppl, pre.n_contacts)),
           "notes": (apps_notes_pay.NOTES, lambda rng, ppl, pre: apps_notes_pay.notes_data(rng)),
           "payments": (apps_notes_pay.PAYMENTS, lambda rng, ppl, pre:
                        apps_notes_pay.payments_data(rng, ppl, pre.n_contacts))}
    reg.update(apps_more.REGISTRY)
    return reg


@functools.cache
def apps_of(preset: Preset) -> dict[str, App]:
    reg, keep = app_registry(), dict(preset.api_subset)
    apps = {a: reg[a][0] for a in preset.apps}
    apps = {a: app.subset(keep[a]) if a in keep else app for a, app in apps.items()}
    return {"supervisor": apps_core.SUPERVISOR, "api_docs": apps_core.API_DOCS, **apps}


@functools.cache
def base_state(preset: Preset) -> tuple[list[dict], dict]:
    """(people, state) of the preset's seeded base world. Cached: callers copy before editing."""
    people = data.people(random.Random(f"{preset.seed}/people"), preset.n_people)
    reg = app_registry()
    state = {"supervisor": data.supervisor_tables(random.Random(f"{preset.seed}/supervisor"),
                                                  people[0], preset.apps)}
    for app in preset.apps:
        state[app] = reg[app][1](random.Random(f"{preset.seed}/{app}"), people, preset)
    return people, state


def task_ids(preset: Preset, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SPLITS)}")
    counts = dict(preset.variants)
    return [f"{s.name}.{split}.{k}" for s in preset.scenarios
            if s.challenge == (split == "test_challenge") for k in range(counts[split])]


def parse_task_id(preset: Preset, task_id: str) -> tuple[Scenario, str, int]:
    """Split a task id into (scenario, split, variant); ValueError says what is valid."""
    parts = str(task_id).split(".")
    if len(parts) != 3 or parts[1] not in SPLITS or not parts[2].isdigit():
        raise ValueError(f"bad task id {task_id!r}: expected '<scenario>.<split>.<k>' with split "
                         f"in {list(SPLITS)}; see list_tasks({preset.name!r}, split)")
    if task_id not in task_ids(preset, parts[1]):
        raise ValueError(f"task {task_id!r} is not in {preset.name}'s {parts[1]!r} split; "
                         f"splits: {list(SPLITS)}; see list_tasks({preset.name!r}, split)")
    return preset.scenario(parts[0]), parts[1], int(parts[2])


def build_task(preset: Preset, task_id: str) -> tuple[dict, TaskSpec]:
    """The task's initial state (a fresh copy) and its spec."""
    scenario, split, _ = parse_task_id(preset, task_id)
    people, base = base_state(preset)
    taken = train_instructions(preset) if preset.shared_people and split != "train" else set()
    for attempt in range(50):
        # With a shared population a held-out draw may repeat a train task: draw again. (A
        # template with nothing to vary, like "What is my payments balance?", keeps its last draw.)
        seed = f"{preset.seed}/{task_id}" + (f"/{attempt}" if attempt else "")
        state = copy_state(base)
        gen = Gen(random.Random(seed), state, people, preset.n_contacts, split,
                  preset.shared_people)
        spec = scenario.make(gen)
        if _task_key(spec) not in taken:
            break
    return state, spec


def _task_key(spec: TaskSpec) -> tuple:
    return spec.instruction, tuple(spec.solution), repr(spec.answer)


@functools.cache
def train_instructions(preset: Preset) -> frozenset[tuple]:
    """Keys of every train task (instruction, solution, answer) of a shared-population preset."""
    return frozenset(_task_key(build_task(preset, t)[1]) for t in task_ids(preset, "train"))


def ground_truth(preset: Preset, task_id: str) -> list[str]:
    """The scripted solution: one code string per turn (a careful agent's: it reads the used
    apps' API list first and walks every page of a list)."""
    return [executed for _, executed in demonstration(preset, task_id)]


def demonstration(preset: Preset, task_id: str, lookup: bool = True,
                  paging: bool = True) -> list[tuple[str, str]]:
    """A scripted agent's turns as (code it writes, code that runs).

    An agent without the lookup habit writes miniworld's first-version API names (recorded when
    they were current, so the world ran today's equivalent); one without the paging habit reads
    the first page of a list only (and may give a wrong answer)."""
    people, _ = base_state(preset)
    _, spec = build_task(preset, task_id)
    habits = Habits(lookup, paging)
    run = render_solution(spec.solution, preset.auth, people[0]["email"], habits)
    written = run if lookup else render_solution(spec.solution, preset.auth, people[0]["email"],
                                                 habits, api_version=1)
    return list(zip(written, run, strict=True))


# A small circle of 8 contacts shared by every split, so a from-scratch model learns their names in
# minutes; held-out tasks are new states (counts, amounts, numbers, messages), never a copy of a
# train task, and success hinges on the behaviours the warm start is imperfect in (README).
TINY = Preset("miniworld-tiny", ("phone", "notes", "payments"), TINY_SCENARIOS, auth=False,
              n_people=16, n_contacts=8, seed=7, shared_people=True,
              variants=(("train", 40), ("dev", 6), ("test_normal", 6), ("test_challenge", 3)),
              api_subset=(("phone", ("search_contacts", "add_contact", "send_text_message",
                                     "search_text_messages")),
                          ("notes", ("search_notes", "create_note", "delete_note")),
                          ("payments", ("show_balance", "send_money", "request_money",
                                        "search_transactions"))))
FULL = Preset("miniworld", ("phone", "notes", "payments", "email", "calendar", "music",
                           "shopping", "file_system"),
              BASIC_SCENARIOS + FULL_SCENARIOS + CROSS_SCENARIOS, auth=True, n_people=80,
              n_contacts=40, seed=11,
              variants=(("train", 3), ("dev", 2), ("test_normal", 2), ("test_challenge", 3)))
PRESETS = {p.name: p for p in (TINY, FULL)}

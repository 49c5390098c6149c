"""The environment protocol every world implements, and the registry of worlds.

An environment runs one episode at a time:

    env = make_env("miniworld-tiny")
    obs = env.reset(task_id)            # Observation: instruction + supervisor facts
    res = env.step(code)                # StepResult(output, done): output is what the agent sees
    ev = env.evaluate()                 # EvalResult(num_tests, passes, failures, reward, success)
    env.close()

Worlds register themselves with `register_world(name, WorldEntry(...))`; `make_env`, `list_tasks`
and `ground_truth` dispatch through that registry, so another world (the real AppWorld, a user's
own) plugs in without touching the callers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol


@dataclasses.dataclass(frozen=True)
class Supervisor:
    """The user the agent works for: the facts a prompt shows."""

    first_name: str
    last_name: str
    email: str
    phone_number: str

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


@dataclasses.dataclass(frozen=True)
class Observation:
    """The start of an episode: what a prompt builder needs."""

    task_id: str
    instruction: str
    supervisor: Supervisor
    date: str                      # today's date in the world, YYYY-MM-DD
    apps: tuple[str, ...]          # app names the agent can use (apis.<app>)
    world: str                     # the world (preset) name


@dataclasses.dataclass(frozen=True)
class StepResult:
    output: str   # the observation text: printed output and/or the error
    done: bool    # the agent called complete_task (or the episode otherwise ended)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    num_tests: int
    passes: tuple[str, ...]
    failures: tuple[str, ...]
    reward: float   # len(passes) / num_tests
    success: bool   # every test passed


class Env(Protocol):
    """The episode interface (see the module docstring)."""

    def reset(self, task_id: str) -> Observation: ...

    def step(self, code: str) -> StepResult: ...

    def evaluate(self) -> EvalResult: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class WorldEntry:
    """How to make and enumerate one world."""

    make_env: Callable[..., Env]
    list_tasks: Callable[[str], list[str]]
    ground_truth: Callable[[str], list[str]] | None = None
    # (task_id, lookup=bool, paging=bool) -> [(code written, code run)]: scripted agents with
    # and without the habits the world rewards (the warm start's demonstrations)
    demonstration: Callable[..., list[tuple[str, str]]] | None = None


_WORLDS: dict[str, WorldEntry] = {}  # the registry: world name -> entry


def register_world(name: str, entry: WorldEntry) -> None:
    _WORLDS[name] = entry


def _entry(world: str) -> WorldEntry:
    from loopjax.envs import miniworld  # noqa: F401,PLC0415  (registers the built-in worlds)
    if world not in _WORLDS:
        raise ValueError(f"unknown world {world!r}; known worlds: {sorted(_WORLDS)}")
    return _WORLDS[world]


def make_env(world: str = "miniworld", **options) -> Env:
    """A new environment of `world` ("miniworld", "miniworld-tiny", "appworld", ...)."""
    return _entry(world).make_env(**options)


def list_tasks(world: str, split: str) -> list[str]:
    """Task ids of a split: "train", "dev", "test_normal" or "test_challenge"."""
    return _entry(world).list_tasks(split)


def ground_truth(task_id: str, world: str = "miniworld") -> list[str]:
    """The scripted solution of a task: one code string per turn."""
    entry = _entry(world)
    if entry.ground_truth is None:
        raise NotImplementedError(f"world {world!r} has no ground-truth solutions")
    return entry.ground_truth(task_id)


def demonstration(task_id: str, world: str, *, lookup: bool = True,
                  paging: bool = True) -> list[tuple[str, str]]:
    """A scripted agent's turns as (code it writes, code the world runs): `lookup` = it reads the
    API docs first (else it writes remembered, outdated API names), `paging` = it reads every
    page of a list (else the first)."""
    entry = _entry(world)
    if entry.demonstration is None:
        if not (lookup and paging):
            raise NotImplementedError(f"world {world!r} has no careless demonstrations")
        return [(code, code) for code in ground_truth(task_id, world)]
    return entry.demonstration(task_id, lookup=lookup, paging=paging)


def scenario_id(task_id: str) -> str:
    """The scenario (template) a task belongs to: tasks of one scenario share a solution shape.

    miniworld ids look like "text_contact.train.3"; AppWorld ids like "82e2fac_1".
    """
    task_id = str(task_id)
    if "." in task_id:
        return task_id.split(".", 1)[0]
    return task_id.rsplit("_", 1)[0] if "_" in task_id else task_id


def _appworld_env(**options):  # imported on use: loopjax.envs.appworld imports this module
    from loopjax.envs.appworld import AppWorldEnv  # noqa: PLC0415
    return AppWorldEnv(**options)


def _appworld_tasks(split: str) -> list[str]:
    from loopjax.envs.appworld import appworld_task_ids  # noqa: PLC0415
    return appworld_task_ids(split)


register_world("appworld", WorldEntry(_appworld_env, _appworld_tasks))

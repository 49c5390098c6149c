"""The environment protocol every world implements: the types only (the registry of worlds is
`loopjax.envs.registry`).

An environment runs one episode at a time:

    env = make_env("miniworld-tiny")
    obs = env.reset(task_id)            # Observation: instruction + supervisor facts
    res = env.step(code)                # StepResult(output, done): output is what the agent sees
    ev = env.evaluate()                 # EvalResult(num_tests, passes, failures, reward, success)
    env.close()

The environment loop (loopjax.rollout.collector) records each finished episode as an
`EpisodeRecord` (its turns, unit-test results and end reason). A world is described by a
`WorldEntry` (how to make its env and list its tasks, and its own behaviour measures over an
`EpisodeRecord`); the registry maps world names to entries, so another world (the real AppWorld,
a user's own) plugs in with `register_world(name, WorldEntry(...))` without touching the callers.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Protocol


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


_ERROR_RE = re.compile(r"(Traceback|Error:|Exception:)")


def shows_error(output: str) -> bool:
    """Whether an environment reply shows a Python error."""
    return bool(_ERROR_RE.search(output))


@dataclasses.dataclass(frozen=True)
class Turn:
    """One agent turn of an episode."""

    assistant: str  # what the agent wrote
    code: str       # the code run from it ("" when it wrote none)
    output: str     # the environment's reply


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    """A finished episode as the environment loop saw it: what reports show and what a world's
    behaviour measures read."""

    task_id: str
    instruction: str
    turns: tuple[Turn, ...]
    end_reason: str                 # complete_task, max_interactions, context_full, script_ended
    result: EvalResult              # the final unit tests
    env_failure: str | None = None  # set when the environment, not the agent, failed

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def code_errors(self) -> int:
        """Turns whose reply shows a Python error."""
        return sum(shows_error(t.output) for t in self.turns)


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
    # episode -> {measure: value}: the world's behaviour measures of one episode (doc lookups,
    # paging, ...); each is averaged over the episodes that report it (loopjax.eval.behaviour)
    behaviour: Callable[[EpisodeRecord], dict[str, float]] | None = None


def scenario_id(task_id: str) -> str:
    """The scenario (template) a task belongs to: tasks of one scenario share a solution shape.

    miniworld ids look like "text_contact.train.3"; AppWorld ids like "82e2fac_1".
    """
    task_id = str(task_id)
    if "." in task_id:
        return task_id.split(".", 1)[0]
    return task_id.rsplit("_", 1)[0] if "_" in task_id else task_id

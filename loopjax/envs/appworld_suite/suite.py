"""Task templates of the AppWorld-format suite, and how their instances are split.

A `Template` makes task instances from the world and a seeded `random.Random`: the instruction,
the records the task adds on top of the base state, the ground-truth solution (code cells run
through AppWorld's `apis`), the answer, and `private_data` for its evaluation function. The
evaluation function is ordinary Python here; build.py copies its source (after checks.py's) into
the task's evaluation.py, which AppWorld imports and calls as
`evaluate(test, public_data, private_data, main_user, models, ground_truth_answer)`.

Splits follow AppWorld's: a template's scenarios (3 tasks each, ids "<scenario>_<n>") go to
train, dev or test_normal; templates over an app that no train task touches make
test_challenge alone.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from people import World

SPLITS = ("train", "dev", "test_normal", "test_challenge")
TASKS_PER_SCENARIO = 3
# A seen template's scenarios, in order: two to train, one each to dev and test_normal.
SEEN_SPLITS = ("train", "train", "dev", "test_normal")
CHALLENGE_SCENARIOS = 4  # an unseen app's template: all its scenarios in test_challenge
# The closing tests of a task that asks for a change (checks.no_answer_and_only runs them).
WRITE_TESTS = (("no answer is given", "no_op_pass"), ("nothing else changes", "no_op_pass"))


@dataclasses.dataclass(frozen=True)
class Instance:
    instruction: str
    solution: tuple[str, ...]  # code cells, the last calls apis.supervisor.complete_task
    private_data: dict  # JSON values the evaluation function checks against
    answer: object = None  # the answer complete_task must receive (None: not a question)
    setup: Callable | None = None  # setup(models): records this task adds to the base state


@dataclasses.dataclass(frozen=True)
class Template:
    name: str  # letters only: the scenario ids are "<name><k>"
    apps: tuple[str, ...]  # the user apps its solution calls (supervisor and api_docs aside)
    difficulty: int  # 1-3, AppWorld's scale
    tests: tuple[tuple[str, str], ...]  # (requirement, label) exactly as evaluate() names them
    make: Callable[[random.Random, World], Instance]
    evaluate: Callable  # evaluate(test, public_data, private_data, main_user, models, answer)
    challenge: bool = False  # over an app no train task uses: test_challenge only

    def __post_init__(self):
        if not self.name.isalpha():
            raise ValueError(f"template name {self.name!r} must be letters only")
        labels = {label for _, label in self.tests}
        if not labels <= {"no_op_fail", "no_op_pass"}:
            raise ValueError(f"{self.name}: labels must be no_op_fail / no_op_pass, got {labels}")


def scenario_splits(template: Template) -> tuple[str, ...]:
    return ("test_challenge",) * CHALLENGE_SCENARIOS if template.challenge else SEEN_SPLITS


def check_suite(templates: list[Template]) -> None:
    """AppWorld's split rule: test_challenge templates use an app no train template uses."""
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise ValueError(f"template names repeat: {names}")
    seen = {app for t in templates if not t.challenge for app in t.apps}
    for t in templates:
        if t.challenge and not set(t.apps) - seen:
            raise ValueError(f"challenge template {t.name} uses only apps train sees: {t.apps}")

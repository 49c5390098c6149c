"""Helpers every generated evaluation.py starts with (their source is copied into the file).

AppWorld imports a task's evaluation.py on its own, so these functions must be self-contained:
no imports beyond the standard library and nothing from loopjax. They compare the task's start
and end databases (AppWorld's `ModelCollectionPair`): the answer given to complete_task, the
records a task may add or change, and every other change, which fails the task.
"""
import json

# Fields an app changes by itself while the agent works (a login stamps last_logged_in).
BOOKKEEPING_FIELDS = {"last_logged_in", "updated_at"}


def given_answer(models):
    """The answer passed to apis.supervisor.complete_task (None when none was)."""
    tasks = models.end.supervisor.Task.all()
    if not tasks or tasks[0].answer in (None, ""):
        return None
    return json.loads(tasks[0].answer)


def added(models, model_name):
    return models.changed_records(model_name)[0]


def updated(models, model_name):
    return models.changed_records(model_name)[1]


def removed(models, model_name):
    return models.changed_records(model_name)[2]


def collateral(models, allowed):
    """Every change outside `allowed`, as readable strings.

    `allowed` maps "app.Model" to the set of field names a task may update in that model, or to
    "add" / "add+update" (records of it may be added, and updated in those fields). Updates of
    bookkeeping fields alone (a login's timestamp) never count.
    """
    problems = []
    for name in sorted(models.changed_model_names()):
        rule = allowed.get(name, set())
        adds, updates, removes = models.changed_records(name)
        if removes:
            problems.append(f"{len(removes)} {name} record(s) removed")
        if adds and not (isinstance(rule, dict) and rule.get("add")):
            problems.append(f"{len(adds)} {name} record(s) added")
        fields_ok = set(rule.get("fields", ())) if isinstance(rule, dict) else set(rule)
        for record in updates:
            fields = models.changed_field_names(name, record.id) or set()
            extra = fields - fields_ok - BOOKKEEPING_FIELDS
            if extra:
                problems.append(f"{name} {record.id} changed in {sorted(extra)}")
    return problems


def no_answer_and_only(test, models, allowed):
    """The two closing tests of every task that asks for a change, not an answer (their names
    are suite.WRITE_TESTS): complete_task got no answer, and nothing outside `allowed` (as in
    collateral) changed."""
    with test("no answer is given"):
        test.case(given_answer(models), "==", None)
    with test("nothing else changes"):
        test.case(collateral(models, allowed), "==", [])

"""Evaluator spraying: for every template of every miniworld preset, a spray of plausible candidates
around the ground truth fails evaluation, with no escape at all (plain agent code through
make_env / reset / step / evaluate).

The sprays are built generically from one task of each template (no task text is hard-coded):
the ground truth runs once with its API calls watched, and the calls that changed the state are
the ones sprayed (the sprays use the ground truth's access tokens, issued as a login would):
- "repeat": before the ground truth, each adding call again with perturbed arguments (another
  phrase, another amount) and verbatim: several messages / notes / payments where one is asked;
- "sink": the ground truth with each string argument of an adding call replaced by one text
  holding the right value and every candidate (the numbers 100 to 900, every person's name);
- "neighbours": before the ground truth, each deleting or updating call again on neighbouring
  records (ids one and two either side, other values of the same field in the state): delete /
  archive / move every candidate (counted where some neighbour existed);
- "answer": the ground truth's answer replaced by a list or a text of candidates around it.
A spray that changed nothing beyond the ground truth (its calls all failed) proves nothing, so the
"repeat" spray must have changed more records than the ground truth; every spray must fail, and
each template must have had at least one spray.
"""
import json

import pytest

from loopjax.envs import ground_truth, list_tasks, make_env, scenario_id
from loopjax.envs.miniworld.env import _num_records
from loopjax.envs.miniworld.evaluator import diff

WORLDS = ("miniworld-tiny", "miniworld")
SPLITS = ("train", "dev", "test_normal", "test_challenge")


def templates(world):
    """One task id per template (scenario) of the world."""
    first = {}
    for split in SPLITS:
        for t in list_tasks(world, split):
            first.setdefault(scenario_id(t), t)
    return sorted(first.items())


CASES = [(w, name, task) for w in WORLDS for name, task in templates(w)]


@pytest.fixture(scope="module")
def envs():
    e = {w: make_env(w, time_limit_s=20.0) for w in WORLDS}
    yield e
    for x in e.values():
        x.close()


def changes(env):
    return len(diff(env._initial, env.world.state))


def watched_ground_truth(env, world, task):
    """Run the ground truth; return (adding calls, other changing calls, answer, changes)."""
    env.reset(task)
    world_obj, adds, others = env.world, [], []
    call = world_obj.call

    def spy(app, api, kwargs):
        before, fingerprint = _num_records(world_obj.state), json.dumps(world_obj.state)
        out = call(app, api, kwargs)
        if app != "supervisor" and json.dumps(world_obj.state) != fingerprint:
            added = _num_records(world_obj.state) > before
            (adds if added else others).append((app, api, dict(kwargs)))
        return out
    world_obj.call = spy
    for code in ground_truth(task, world):
        env.step(code)
    assert env.evaluate().success, task
    return adds, others, world_obj.answer, changes(env)


def call_code(app, api, kwargs):
    return f"try:\n    apis.{app}.{api}(**{json.dumps(kwargs)})\nexcept ApiError:\n    pass\n"


def perturb(kwargs, i):
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, bool) or k in ("access_token", "page_index", "page_limit"):
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v + i
        elif isinstance(v, str) and "@" not in v and not v.startswith("+") and k not in (
                "to", "receiver", "recipient", "email", "phone_number", "username"):
            out[k] = v + f" (option {i})"
        else:
            out[k] = v
    return out


def field_values(state, key, not_this):
    """Other string values of a field named `key` in the state's records (sorted)."""
    out = set()
    for app in state.values():
        for table in app.values():
            for record in table.values():
                v = record.get(key) if isinstance(record, dict) else None
                if isinstance(v, str) and v != not_this:
                    out.add(v)
    return sorted(out)


def run(env, world, task, prefix="", solution=None):
    env.reset(task)
    if prefix:  # the prefix uses the ground truth's access tokens: issue them (as a login would)
        for app in env.world.apps:
            for k in range(1, 4):
                env.world.tokens.setdefault(f"{app}-token-{k}", app)
        env.step(prefix)
    for code in solution or ground_truth(task, world):
        env.step(code)
    return env.evaluate()


@pytest.mark.parametrize("world,template,task", CASES, ids=[f"{w}:{n}" for w, n, _ in CASES])
def test_spraying_fails(envs, world, template, task):
    env = envs[world]
    adds, others, answer, gt_changes = watched_ground_truth(env, world, task)
    people = [p["name"] for p in env.world.people]
    checked = 0

    if adds:  # several records where the task asks for one
        prefix = "".join(call_code(app, api, perturb(kw, i)) for app, api, kw in adds
                         for i in (1, 2)) + "".join(call_code(*c) for c in adds)
        ev = run(env, world, task, prefix)
        assert changes(env) > gt_changes, "the spray changed nothing"
        assert not ev.success, (template, "repeat", ev)
        checked += 1

        sink_words = [str(i) for i in range(100, 901)] + people
        solution = ground_truth(task, world)
        for _app, _api, kw in adds:
            for k, v in kw.items():
                literal = json.dumps(v) if isinstance(v, str) else None
                if not literal or len(v) < 3 or not any(literal in code for code in solution):
                    continue
                sink = json.dumps(v + " " + " ".join(sink_words))
                ev = run(env, world, task, solution=[c.replace(literal, sink) for c in solution])
                assert not ev.success, (template, "sink", k, ev)
                checked += 1

    if others:  # the same deletion or update on neighbouring records (other ids, other values)
        prefix = ""
        for app, api, kw in others:
            for i in (-2, -1, 1, 2):
                prefix += call_code(app, api, {k: (v + i if isinstance(v, int)
                                                   and not isinstance(v, bool) else v)
                                               for k, v in kw.items()})
            for k, v in kw.items():
                if isinstance(v, str) and k != "access_token":
                    for n, other in enumerate(field_values(env._initial, k, v)[:4]):
                        prefix += call_code(app, api, dict(kw, **{k: other}))
                        prefix += call_code(app, api, {  # with the other strings made unique
                            k2: other if k2 == k else f"{v2}.{n}" if isinstance(v2, str)
                            and k2 != "access_token" else v2 for k2, v2 in kw.items()})
        ev = run(env, world, task, prefix)
        if changes(env) > gt_changes:  # some neighbour existed and was changed
            assert not ev.success, (template, "neighbours", ev)
            checked += 1

    if answer is not None and not isinstance(answer, bool):
        for sprayed in ([answer] + [f"{answer}{i}" for i in range(3)] + people[:5],
                        f"{answer}, " + ", ".join(str(i) for i in range(100, 901)),
                        " or ".join([str(answer)] + people)):
            env.reset(task)
            for code in ground_truth(task, world):
                env.step(code)
            env.world.answer = sprayed  # as if complete_task(answer=<the spray>) had been called
            ev = env.evaluate()
            assert not ev.success, (template, "answer", sprayed if len(str(sprayed)) < 200 else "")
            checked += 1
    assert checked, f"{template}: nothing to spray (no added, deleted records or answer)"

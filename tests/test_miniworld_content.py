"""miniworld: a text, note, email or payment that must say a value says exactly that value.

Every template of both presets whose ground truth writes what a text, an email (subject, body), a
note or file (content) or a payment (description) says is run, on every task, with that content
replaced by ONE record holding every candidate, the right value included: the task fails on that
one check (the record was still sent, nothing else changed). The candidates are the template's
own where its check reads a value from the world (every balance, location, order total, song
title), else every person's name and the numbers 100 to 900. The templates whose content is a
value read from the world are also run with the content in another accepted form (a formatted
number, other case and spacing), which succeeds, and as they are, which succeeds. The content is
swapped where the world receives the call, so it takes the ground truth's path to the world.
"""
import pytest

import test_sandbox_spray
from loopjax.envs import ground_truth, list_tasks, scenario_id
from test_sandbox_spray import SPLITS, WORLDS, templates

envs = test_sandbox_spray.envs  # the fixture: one env per preset


def _locations(state):
    return [e["location"] for e in state["calendar"]["events"].values()]


def _totals(state):
    return [str(o["total"]) for o in state["shopping"]["orders"].values()]


def _song_titles(state):
    return [s["title"] for s in state["music"]["songs"].values()]


# template -> (API whose argument is the content, that argument, candidates from the task's
# initial state, the separator of the spray, the content in another accepted form)
CONTENT = {
    "text_balance": ("send_text_message", "message", lambda s: [str(i) for i in range(100, 901)],
                     " ", lambda v: f"  ${int(v):,.2f} "),
    "text_event_location": ("send_text_message", "message", _locations, ", ",
                            lambda v: f" {v.upper()}  "),
    "note_order_total": ("create_note", "content", _totals, " ", lambda v: f"${float(v):,.2f}"),
    "email_playlist": ("send_email", "body", _song_titles, "\n",
                       lambda v: "\n".join(f"  {t}  " for t in v.split("\n")) + "\n"),
}
ARGS = ("message", "subject", "body", "content", "description")  # what a record says
CASES = [(w, name) for w in WORLDS for name, _ in templates(w)]


def run(env, world, task, api, arg, rewrite=None):
    """The ground truth, with `arg` of the `api` call rewritten by rewrite(value) on its way to
    the world; returns (evaluation, the values the ground truth passed)."""
    env.reset(task)
    call, seen = env.world.call, []

    def rewritten(app, name, kwargs):
        if name == api and rewrite is not None and isinstance(kwargs.get(arg), str):
            seen.append(kwargs[arg])
            kwargs = dict(kwargs, **{arg: rewrite(kwargs[arg])})
        return call(app, name, kwargs)
    env.world.call = rewritten
    for code in ground_truth(task, world):
        env.step(code)
    return env.evaluate(), seen


def tasks_of(world, template):
    return [t for s in SPLITS for t in list_tasks(world, s) if scenario_id(t) == template]


def content_args(env, world, task):
    """(API, argument) pairs of the ground truth's calls that say something (ARGS)."""
    env.reset(task)
    call, found = env.world.call, []

    def watched(app, name, kwargs):
        found.extend((name, a) for a in ARGS if isinstance(kwargs.get(a), str))
        return call(app, name, kwargs)
    env.world.call = watched
    for code in ground_truth(task, world):
        env.step(code)
    return list(dict.fromkeys(found))


def test_the_templates_named_here_exist():
    """Both presets have the templates named in CONTENT (a renamed one would go untested)."""
    assert set(CONTENT) <= {name for _, name in CASES}
    assert ("miniworld-tiny", "text_balance") in CASES


@pytest.mark.parametrize("world,template", CASES, ids=[f"{w}:{n}" for w, n in CASES])
def test_content_sprayed_with_candidates_fails(envs, world, template):
    env, tasks = envs[world], tasks_of(world, template)
    for task in tasks if template in CONTENT else tasks[:1]:  # every task where a value is read
        ev, _ = run(env, world, task, None, None)
        assert ev.success, (task, ev.failures)
        people = [p["name"] for p in env.world.people]
        args, own = content_args(env, world, task), CONTENT.get(template)
        assert not own or own[:2] in args, (task, args)
        for api, arg in args:
            if own and (api, arg) == own[:2]:
                others, sep = list(dict.fromkeys(own[2](env._initial))), own[3]
            else:
                others, sep = people + [str(i) for i in range(100, 901)], ", "

            def spray(value, others=others, sep=sep):
                rest = [c for c in others if c != value]
                assert rest, "no other candidate to spray"
                return sep.join(sorted(rest + [value]))
            ev, seen = run(env, world, task, api, arg, spray)
            assert seen, (task, api, arg)
            assert not ev.success and len(ev.failures) == 1, (task, api, arg, ev.failures)


@pytest.mark.parametrize("world,template", [c for c in CASES if c[1] in CONTENT],
                         ids=[f"{w}:{n}" for w, n in CASES if n in CONTENT])
def test_content_in_another_accepted_form_succeeds(envs, world, template):
    env, (api, arg, _, _, formatted) = envs[world], CONTENT[template]
    for task in tasks_of(world, template):
        ev, seen = run(env, world, task, api, arg, formatted)
        assert len(seen) == 1 and ev.success, (task, seen, ev.failures)

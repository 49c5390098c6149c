"""miniworld-tiny rewards behaviour: the careless scripted agents that the warm start imitates fail
where the careful ones succeed, for the reason each habit names; and the behaviour measures read
those habits back from an episode's code."""

import dataclasses

import numpy as np
import pytest

from conftest import as_rollout
from loopjax import warmstart
from loopjax.envs import EvalResult, demonstration, ground_truth, list_tasks, make_env
from loopjax.envs.base import EpisodeRecord, Turn
from loopjax.envs.behaviour import api_behaviour, call_order, code_habits
from loopjax.envs.miniworld.scenario import V1_NAMES
from loopjax.eval import behaviour, held_out_tgc

WORLD = "miniworld-tiny"


@pytest.fixture(scope="module")
def env():
    e = make_env(WORLD)
    yield e
    e.close()


def _play(env, task, turns):
    env.reset(task)
    outs = [env.step(run).output for _, run in turns]
    return env.evaluate(), outs


def _tasks(split, every):
    return list_tasks(WORLD, split)[::every]


def test_careful_agent_is_the_ground_truth_and_looks_up_docs_first():
    for task in _tasks("train", 7) + _tasks("dev", 2):
        turns = demonstration(task, WORLD)
        assert [w for w, _ in turns] == [r for _, r in turns] == ground_truth(task, WORLD)
        assert turns[0][0].startswith("print(apis.api_docs.show_api_descriptions(app_name=")


def test_without_lookup_the_agent_writes_first_version_names_that_fail_today(env):
    old = {f"apis.{app}.{name}(" for (app, _), name in V1_NAMES.items()}
    for task in _tasks("train", 5) + _tasks("test_normal", 1):
        turns = demonstration(task, WORLD, lookup=False)
        written = "\n".join(w for w, _ in turns)
        assert "api_docs" not in written and any(o in written for o in old), (task, written)
        # Run as written (not as recorded against the first version), it never succeeds: the
        # first call of an outdated name is a 404 that points at the docs.
        env.reset(task)
        outs = [env.step(w).output for w, _ in turns]
        assert not env.evaluate().success, (task, outs)
        assert any("unknown api" in o and "show_api_descriptions" in o for o in outs), outs


def test_without_paging_the_answer_is_wrong_exactly_when_it_is_past_the_first_page(env):
    paged = [t for t in list_tasks(WORLD, "train")
             if "page_index" in "".join(ground_truth(t, WORLD))]
    assert {t.split(".")[0] for t in paged} == {"count_texts", "count_notes", "total_received"}
    right = []
    for task in paged[::2]:
        careful, _ = _play(env, task, demonstration(task, WORLD))
        assert careful.success, task
        first_page, _ = _play(env, task, demonstration(task, WORLD, paging=False))
        right.append(first_page.success)
    # 1-12 records were added per task (besides the base state's) and a page holds 5: some first
    # pages hold the whole answer, most do not (measured: 12 of 60 here).
    assert 0.1 < np.mean(right) < 0.6, np.mean(right)


def test_scripted_agents_mix_habits_at_the_requested_share():
    tasks = list_tasks(WORLD, "train")
    demo = warmstart.scripted_agents(WORLD, 0.3, seed=0)
    looked = [demo(t)[0][0][0].startswith("print(apis.api_docs") for t in tasks]
    assert 0.25 < np.mean(looked) < 0.35
    assert demo(tasks[3]) == warmstart.scripted_agents(WORLD, 0.3, seed=0)(tasks[3])  # seeded
    careful = warmstart.scripted_agents(WORLD, 1.0, 0)  # every agent careful: SFT-GT
    for t in tasks[::6]:  # every template
        assert careful(t) == ([(code, code) for code in ground_truth(t, WORLD)], True)
    with pytest.raises(ValueError, match="demo_careful"):
        warmstart.scripted_agents(WORLD, 1.5, 0)


def test_held_out_tgc_weights_each_split_by_its_tasks():
    summaries = {"dev": {"tgc": 0.5, "num_tasks": 30}, "test_normal": {"tgc": 0.2, "num_tasks": 10},
                 "test_challenge": {"tgc": 1.0, "num_tasks": 6}}
    assert held_out_tgc(summaries) == pytest.approx((15 + 2) / 40)  # challenge is not held-out TGC
    assert held_out_tgc({"dev": summaries["dev"]}) == 0.5


def turns(*codes, output=""):
    return tuple(Turn("", c, output) for c in codes)


def test_behaviour_measures_read_the_habits_from_code():
    b = code_habits(turns('print(apis.api_docs.show_api_descriptions(app_name="notes"))',
                        'ns, page = [], 0\nwhile got := apis.notes.search_notes(query="x", '
                        'page_index=page):\n    ns, page = ns + got, page + 1\n'
                        'apis.supervisor.complete_task(answer=len(ns))'))
    assert b == {"doc_lookups": 1, "paginated": True, "answered_without_lookup": False}
    blind = code_habits(turns("apis.supervisor.complete_task(answer=12)"))
    assert blind == {"doc_lookups": 0, "paginated": False, "answered_without_lookup": True}
    # A state read in an earlier turn counts as a lookup; one after the answer does not.
    assert not code_habits(turns("x = apis.notes.search_notes(query='a')",
                                 "apis.supervisor.complete_task(answer=3)"))["answered_without_lookup"]
    assert code_habits(turns("apis.supervisor.complete_task(answer=3)\n"
                             "apis.notes.search_notes(query='a')"))["answered_without_lookup"]


def test_call_order_reads_docs_logins_and_recovery_in_the_order_run():
    ok, err = "ok", "Traceback (most recent call last): Exception: bad password"
    steps = (Turn("", "apis.api_docs.show_api_doc(app_name='phone', api_name='login')\n"
                      "t = apis.phone.login(username='u', password='p')", ok),
             Turn("", "apis.phone.search_contacts(access_token=t)\n"
                      "apis.api_docs.show_api_doc('phone', 'search_contacts')", ok),
             Turn("", "apis.venmo.login(username='u', password='x')", err),
             Turn("", "apis.venmo.show_transactions()", ok))
    order = call_order(steps)
    # phone.login documented first, search_contacts before its doc, venmo's two never
    assert order["docs_before_call"] == 1 / 4
    assert order["logged_in"] == {"phone"}  # venmo's login raised
    assert order["recovered"] is True
    assert call_order(steps[:3])["recovered"] is False
    assert call_order(steps[:1])["recovered"] is None
    # a login after the app's first other call is not a login before use
    late = (Turn("", "apis.phone.search_contacts()\napis.phone.login()", ok),)
    assert call_order(late)["logged_in"] == set()
    assert call_order(
        (Turn("", "apis.supervisor.complete_task()", ok),))["docs_before_call"] is None


def test_logins_right_for_the_apps_the_ground_truth_logs_into():
    """The hook reports logins_right only for tasks whose ground truth logs in, and 1 only when
    the episode logged into every such app before using it."""
    solutions = {"pay": ["t = apis.venmo.login(username='u', password='p')",
                         "apis.venmo.create_transaction(access_token=t)"], "ask": ["print(1)"]}
    hook = api_behaviour(solutions.__getitem__)
    ok = EvalResult(1, ("t",), (), 1.0, True)

    def measure(task, *codes):
        return hook(EpisodeRecord(task, "", turns(*codes, output="ok"), "complete_task", ok))

    assert measure("pay", "apis.venmo.login()",
                   "apis.venmo.create_transaction()")["logins_right"] == 1
    assert measure("pay", "apis.venmo.create_transaction()",
                   "apis.venmo.login()")["logins_right"] == 0
    assert measure("pay", "apis.phone.login()")["logins_right"] == 0
    assert "logins_right" not in measure("ask", "apis.venmo.login()")


def test_the_worlds_behaviour_hook_and_its_means():
    """miniworld's hook reports paging only for tasks whose ground truth pages; eval.behaviour
    averages each measure over the episodes that report it, next to the generic ones (turns,
    code-error rate); a world without a hook gets the generic ones only."""
    pages = {t: "page_index" in "".join(ground_truth(t, WORLD)) for t in list_tasks(WORLD, "train")}
    paged, flat = (next(t for t, p in pages.items() if p is want) for want in (True, False))
    ok = EvalResult(1, ("t",), (), 1.0, True)
    episodes = [EpisodeRecord(paged, "", turns("print(apis.api_docs.show_app_descriptions())",
                                               "x = apis.notes.search_notes(page_index=0)"),
                              "complete_task", ok),
                EpisodeRecord(paged, "", turns("apis.supervisor.complete_task(answer=1)"),
                              "complete_task", ok),
                EpisodeRecord(flat, "", turns("1 / 0", output="Traceback: ZeroDivisionError"),
                              "max_interactions", ok)]
    records = [dataclasses.replace(as_rollout([1], [False], [0.0], [0]), episode=e)
               for e in episodes]
    assert behaviour(records, WORLD) == {
        "code_error_rate": 1 / 4, "turns": 4 / 3, "doc_lookups": 1 / 3,
        "answered_without_lookup": 1 / 3, "paginate_when_needed": 1 / 2,
        "docs_before_call": 0.0, "recovered": 0.0}
    assert behaviour(records, "a world no one registered") == {"code_error_rate": 1 / 4,
                                                               "turns": 4 / 3}


def test_rft_baseline_keeps_only_solved_rollouts_with_advantage_one():
    from loopjax.loop import advantages, keep_mask
    rewards = np.array([[1.0, 0.5, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2]], np.float32)
    adv = np.asarray(advantages(rewards, "rft"))
    np.testing.assert_array_equal(adv, [[1, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(keep_mask(adv.ravel())),
                                  [True, False, False, True] + [False] * 4)

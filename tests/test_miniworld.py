"""miniworld: ground truths solve every task, doing nothing fails, collateral changes fail,
determinism, splits, docs, API validation and the Env registry."""
import hashlib
import json
import subprocess
import sys

import pytest

from loopjax.envs import ground_truth, list_tasks, make_env, scenario_id
from loopjax.envs.miniworld import PRESETS
from loopjax.envs.miniworld.data import canonical_json
from loopjax.envs.miniworld.scenario import SPLITS
from loopjax.envs.miniworld.tasks import build_task

WORLDS = ("miniworld-tiny", "miniworld")


@pytest.fixture(scope="module", params=WORLDS)
def world_env(request):
    env = make_env(request.param)
    yield request.param, env
    env.close()


def _all_tasks(world):
    return [t for split in SPLITS for t in list_tasks(world, split)]


def _extra_note_code(world):
    """A harmless-looking extra change: a new note (with a login in the full preset)."""
    if PRESETS[world].auth:
        return ('pw2 = {a["account_name"]: a["password"] for a in '
                'apis.supervisor.show_account_passwords()}\n'
                'me = apis.supervisor.show_profile()["email"]\n'
                'tok2 = apis.notes.login(username=me, password=pw2["notes"])["access_token"]\n'
                'apis.notes.create_note(access_token=tok2, title="Reminder", content="hi")\n')
    return 'apis.notes.create_note(title="Reminder", content="hi")\n'


def test_ground_truth_solves_every_task_and_extra_change_fails(world_env):
    world, env = world_env
    extra = _extra_note_code(world)
    for task in _all_tasks(world):
        env.reset(task)
        turns = ground_truth(task, world)
        outs = [env.step(code).output for code in turns]
        ev = env.evaluate()
        assert ev.success and ev.reward == 1.0, (task, turns, outs, ev.failures)
        # Same solution plus one extra, harmless-looking change: the collateral test fails.
        env.reset(task)
        for code in turns[:-1]:
            env.step(code)
        env.step(extra + turns[-1])
        ev = env.evaluate()
        assert not ev.success and any("collateral" in f for f in ev.failures), (task, ev)


def test_doing_nothing_never_succeeds(world_env):
    world, env = world_env
    for task in _all_tasks(world):
        env.reset(task)
        ev = env.evaluate()
        assert not ev.success and ev.reward < 1.0 and ev.num_tests >= 2


def test_wrong_answer_gets_partial_credit_only():
    env = make_env("miniworld")
    env.reset("text_contact.train.0")
    inst = env.instruction
    name = inst.split("to ", 1)[1].split(" saying")[0].strip('"')
    login = ground_truth("text_contact.train.0", "miniworld")[-1].split("apis.phone.send")[0]
    env.step(login + f'apis.phone.send_text_message(access_token=phone_token, to="{name}", '
             'message="wrong words")\napis.supervisor.complete_task()')
    ev = env.evaluate()
    env.close()
    assert not ev.success and 0 < ev.reward < 1 and len(ev.failures) == 1


@pytest.mark.parametrize("world", WORLDS)
def test_task_state_and_docs_are_deterministic(world):
    preset = PRESETS[world]
    task = list_tasks(world, "dev")[0]
    (s1, spec1), (s2, spec2) = build_task(preset, task), build_task(preset, task)
    assert canonical_json(s1) == canonical_json(s2)
    assert spec1.instruction == spec2.instruction and spec1.solution == spec2.solution
    # Across processes too (a different hash seed must not matter).
    code = (f"from loopjax.envs.miniworld.tasks import build_task, PRESETS, apps_of\n"
            f"from loopjax.envs.miniworld.data import canonical_json\nimport hashlib\n"
            f"s, spec = build_task(PRESETS[{world!r}], {task!r})\n"
            f"docs = [a.doc({preset.auth}) for app in apps_of(PRESETS[{world!r}]).values() "
            f"for a in app.apis.values()]\n"
            f"print(hashlib.sha256((canonical_json(s) + canonical_json(docs) + spec.instruction)"
            f".encode()).hexdigest())")
    from loopjax.envs.miniworld.tasks import apps_of
    docs = [a.doc(preset.auth) for app in apps_of(preset).values() for a in app.apis.values()]
    here = hashlib.sha256((canonical_json(s1) + canonical_json(docs) + spec1.instruction)
                          .encode()).hexdigest()
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, check=True)
    assert there.stdout.strip() == here


@pytest.mark.parametrize("world", WORLDS)
def test_splits(world):
    preset = PRESETS[world]
    by_name = {s.name: s for s in preset.scenarios}
    train_combos = {frozenset(by_name[scenario_id(t)].apps) for t in list_tasks(world, "train")}
    for t in list_tasks(world, "test_challenge"):
        assert frozenset(by_name[scenario_id(t)].apps) not in train_combos
    ids = {split: set(list_tasks(world, split)) for split in SPLITS}
    assert all(ids[split] for split in SPLITS)
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values()))
    assert {s.difficulty for s in preset.scenarios} == {1, 2, 3}


def test_full_preset_size():
    preset = PRESETS["miniworld"]
    assert len(preset.scenarios) >= 30
    from loopjax.envs.miniworld.tasks import apps_of
    apps = apps_of(preset)
    assert len(apps) - 2 >= 6  # user apps besides supervisor and api_docs
    assert sum(len(a.apis) for a in apps.values()) >= 60
    for s in preset.scenarios:
        assert len([t for t in _all_tasks("miniworld") if scenario_id(t) == s.name]) >= 3


def test_tiny_preset_is_small_and_short():
    preset = PRESETS["miniworld-tiny"]
    assert len(preset.apps) <= 3 and 8 <= len(preset.scenarios) <= 16
    from loopjax.envs.miniworld.tasks import apps_of
    assert sum(len(a.apis) for a in apps_of(preset).values()) <= 20  # small docs
    for task in _all_tasks("miniworld-tiny"):
        turns = ground_truth(task, "miniworld-tiny")  # a docs lookup, then 1-2 turns of solution
        assert 2 <= len(turns) <= 3
        assert all(len(t.splitlines()) <= 4 for t in turns), turns
    env = make_env("miniworld-tiny")
    obs = env.reset(list_tasks("miniworld-tiny", "train")[0])
    env.close()
    assert obs.instruction.count(".") <= 2 and obs.supervisor.email and obs.date
    # The tiny world shares one population across splits, so held-out tasks are new combinations:
    # none repeats a train task (instruction, solution and answer), except templates with nothing
    # to vary (the balance question).
    assert preset.shared_people
    from loopjax.envs.miniworld.tasks import _task_key, train_instructions
    taken = train_instructions(preset)
    for split in ("dev", "test_normal"):
        repeats = {t.split(".")[0] for t in list_tasks("miniworld-tiny", split)
                   if _task_key(build_task(preset, t)[1]) in taken}
        assert repeats <= {"balance_question"}, repeats


def test_docs_api_validation_and_pagination():
    env = make_env("miniworld")
    env.reset(list_tasks("miniworld", "train")[0])
    out = env.step("print(apis.api_docs.show_api_doc(app_name='phone', api_name="
                   "'search_contacts'))").output
    doc = eval(out)  # noqa: S307 (our own printed dict)
    assert {"app_name", "api_name", "description", "parameters", "response_schemas"} <= set(doc)
    names = [p["name"] for p in doc["parameters"]]
    assert names[0] == "access_token" and "page_index" in names and "page_limit" in names
    limit = next(p for p in doc["parameters"] if p["name"] == "page_limit")
    assert limit["default"] == 5 and limit["constraints"]
    assert "401" in env.step("apis.phone.search_contacts(access_token='bad')").output
    setup = ('pw = {a["account_name"]: a["password"] for a in '
             'apis.supervisor.show_account_passwords()}\n'
             'me = apis.supervisor.show_profile()["email"]\n'
             't = apis.phone.login(username=me, password=pw["phone"])["access_token"]\n'
             'print(len(apis.phone.search_contacts(access_token=t, page_limit=3, page_index=1)))')
    assert env.step(setup).output == "3"
    assert "422" in env.step("apis.phone.search_contacts(access_token=t, page_limit=99)").output
    assert "missing required" in env.step("apis.phone.send_text_message(access_token=t)").output
    assert "expected integer" in env.step(
        "apis.phone.show_contact(access_token=t, contact_id='x')").output
    assert "unknown api" in env.step("apis.phone.fly(access_token=t)").output
    env.close()


def test_registry_and_errors():
    assert scenario_id("text_contact.train.3") == "text_contact"
    assert scenario_id("82e2fac_1") == "82e2fac"
    with pytest.raises(ValueError, match="test_challenge"):
        list_tasks("miniworld-tiny", "validation")
    env = make_env("miniworld-tiny")
    with pytest.raises(ValueError, match="splits"):
        env.reset("no_such_task.train.0")
    env.close()
    with pytest.raises(ValueError, match="known worlds"):
        make_env("nope")
    with pytest.raises(NotImplementedError):  # AppWorld is not installed in the test session
        make_env("appworld")
    json.dumps(ground_truth(list_tasks("miniworld", "dev")[0]))

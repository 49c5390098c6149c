"""The real AppWorld engine (appworld 0.1.3.post1 in its own venv) on the AppWorld-format suite.

Set up by `python -m loopjax.envs.appworld_setup` (CI's .ci/run does it first); without a set-up
these tests skip, except under CI=true, where they fail. Every task of the suite runs its
ground truth through loopjax's adapter and AppWorld's own evaluation; no-ops and plausible wrong
solutions fail; the server survives SIGKILL (replay) and SIGSTOP (timeout, restart).
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from loopjax.envs import list_tasks, make_env, scenario_id
from loopjax.envs.appworld import AppWorldEnv, AppWorldError, AppWorldUnavailable, solution_cells
from loopjax.envs.appworld_setup import BUILD_SCRIPT, installed

SPLITS = ("train", "dev", "test_normal", "test_challenge")


@pytest.fixture(scope="module")
def suite():
    found = installed()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("AppWorld is not set up: .ci/run must run "
                        "python -m loopjax.envs.appworld_setup")
        pytest.skip("run python -m loopjax.envs.appworld_setup to test the real AppWorld engine")
    python, root = found
    with open(os.path.join(root, "suite.json")) as f:
        info = json.load(f)
    return python, root, info


@pytest.fixture(scope="module")
def env(suite):
    python, root, _ = suite
    e = AppWorldEnv(root=root, python=python, execute_timeout_s=20, request_timeout_s=20)
    yield e
    e.close()


def _gt(task_id, root):
    with open(os.path.join(root, "data", "tasks", task_id, "ground_truth", "answer.json")) as f:
        return json.load(f)


def _run(env, task_id, cells):
    env.reset(task_id)
    for cell in cells:
        if env.step(cell).done:
            break
    return env.evaluate()


def test_suite_shape_follows_appworld(suite):
    _, root, info = suite
    ids = {split: list_tasks("appworld-synth", split) for split in SPLITS}
    assert sum(map(len, ids.values())) == info["tasks"] >= 150
    assert len(info["templates"]) >= 12
    assert len({app for apps in info["templates"].values() for app in apps}) >= 5
    for task_ids in ids.values():
        for task_id in task_ids:
            assert (task_id.count("_") == 1
                    and os.path.isdir(os.path.join(root, "data", "tasks", task_id)))
    scenarios = {split: {scenario_id(t) for t in task_ids} for split, task_ids in ids.items()}
    for a in SPLITS:  # a scenario lives in one split
        for b in SPLITS:
            assert a == b or not scenarios[a] & scenarios[b]

    def apps(split):
        out = set()
        for t in ids[split]:
            with open(os.path.join(root, "data", "tasks", t, "ground_truth",
                                   "required_apps.json")) as f:
                out |= set(json.load(f))
        return out
    assert apps("test_challenge") - apps("train"), "test_challenge needs an app train never uses"


def test_every_ground_truth_succeeds_and_noops_fail(suite, env):
    """Every task of every split: the ground truth passes all of AppWorld's tests, a no-op
    (complete_task alone) fails at least one."""
    _, root, _ = suite
    bad = []
    for split in SPLITS:
        for task_id in list_tasks("appworld-synth", split):
            ev = _run(env, task_id, solution_cells(task_id, root))
            if not (ev.success and ev.reward == 1.0 and ev.num_tests >= 2):
                bad.append((task_id, "ground truth", ev.failures))
            noop = _run(env, task_id, ["apis.supervisor.complete_task()"])
            if noop.success or noop.reward == 1.0:
                bad.append((task_id, "no-op passed", noop.passes))
    assert not bad, bad[:5]


def _typo(cells, private):
    """The solution with each value the check compares (private_data) slightly wrong."""
    out = list(cells)
    for value in private.values():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            continue
        wrong = value + " x" if isinstance(value, str) else round(value + 1, 2)
        out = [c.replace(repr(value), repr(wrong)) for c in out]
    return out


def _stray_change(root, task_id, apps):
    """A cell that changes an app the task is not about: the right work plus it must fail."""
    with open(os.path.join(root, "data", "tasks", task_id, "specs.json")) as f:
        me = json.load(f)["supervisor"]
    passwords = ("pw = {p['account_name']: p['password'] for p in "
                 "apis.supervisor.show_account_passwords()}\n")
    if "simple_note" not in apps:
        return (passwords + f"t = apis.simple_note.login(username={me['email']!r}, "
                "password=pw['simple_note'])['access_token']\n"
                "apis.simple_note.create_note(title='stray', content='x', access_token=t)")
    return (passwords + f"t = apis.phone.login(username={me['phone_number']!r}, "
            "password=pw['phone'])['access_token']\n"
            "apis.phone.create_alarm(time='07:00', access_token=t)")


def test_wrong_solutions_fail(suite, env):
    """On one task per template: an answer off by one, or the values the check compares
    written slightly wrong, or the right work without logging in, or the right work plus a
    change in another app, fails."""
    _, root, info = suite
    for template in info["templates"]:
        task_id = f"{template}0_1"
        cells = solution_cells(task_id, root)
        answer = _gt(task_id, root)
        gt_dir = os.path.join(root, "data", "tasks", task_id, "ground_truth")
        with open(os.path.join(gt_dir, "private_data.json")) as f:
            private = json.load(f)
        wrongs = [_typo(cells, private)]
        if answer is not None:
            wrongs.append(cells[:-1] + [f"apis.supervisor.complete_task(answer={answer!r} + 1)"
                                        if isinstance(answer, (int, float)) else
                                        f"apis.supervisor.complete_task(answer={answer!r} + 'x')"])
        wrongs.append([c.replace("passwords[", "'wrong-password' or passwords[") for c in cells])
        wrongs.append(cells[:-1] + [_stray_change(root, task_id, info["templates"][template])]
                      + cells[-1:])
        wrongs = [w for w in wrongs if w != cells]  # a typo needs the values in the code
        assert len(wrongs) >= 2, (template, "too few mutations apply")
        for wrong in wrongs:
            ev = _run(env, task_id, wrong)
            assert not ev.success, (template, wrong, ev.passes)


def test_server_killed_mid_episode_replays(suite, env):
    _, root, _ = suite
    task_id = list_tasks("appworld-synth", "dev")[0]
    cells = solution_cells(task_id, root)
    env.reset(task_id)
    env.step(cells[0])
    os.killpg(env.server_pid, signal.SIGKILL)
    for cell in cells[1:]:
        env.step(cell)
    ev = env.evaluate()
    assert env.restarts == 1 and env.failure is None and ev.success


def test_stopped_server_times_out_and_restarts(suite):
    python, root, _ = suite
    e = AppWorldEnv(root=root, python=python, execute_timeout_s=3, request_timeout_s=60)
    try:
        task_id = list_tasks("appworld-synth", "train")[0]
        cells = solution_cells(task_id, root)
        e.reset(task_id)
        os.killpg(e.server_pid, signal.SIGSTOP)  # hung: answers nothing
        for cell in cells:
            e.step(cell)
        assert e.restarts == 1 and e.evaluate().success
    finally:
        e.close()


def test_bad_input_is_explained(suite, env, tmp_path):
    python, root, _ = suite
    with pytest.raises(ValueError, match="unknown AppWorld task 'nope_1'"):
        env.reset("nope_1")
    with pytest.raises(AppWorldUnavailable, match="holds no AppWorld data"):
        AppWorldEnv(root=str(tmp_path), python=python)
    for sub in ("tasks/broken_1", "datasets"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    broken = AppWorldEnv(root=str(tmp_path), python=python)
    try:
        with pytest.raises(AppWorldError, match="could not initialize AppWorld task broken_1"):
            broken.reset("broken_1")  # no specs.json: AppWorld's /initialize fails
        assert broken.server.proc.poll() is None  # an answered 500 is not a crash
    finally:
        broken.close()
    with pytest.raises(AppWorldError, match="HTTP 409"):  # a world the server has not loaded
        env.reset(list_tasks("appworld-synth", "dev")[0])
        env.server.post("execute", {"task_id": "other_1", "code": "print(1)"}, 10)


def test_server_listens_on_a_private_unix_socket_only(env):
    env.reset(list_tasks("appworld-synth", "dev")[0])
    assert env.server.url.startswith("unix:")
    path = env.server.url[5:]
    # uvicorn makes the socket file 0666; its folder (mkdtemp's 0700) is what keeps others out
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    with (open(f"/proc/{env.server_pid}/net/tcp") as f4,
          open(f"/proc/{env.server_pid}/net/tcp6") as f6):
        listening = [ln for ln in (f4.read() + f6.read()).splitlines()[1:] if ln.split()[3] == "0A"]
    inodes = {ln.split()[9] for ln in listening}
    fds = os.listdir(f"/proc/{env.server_pid}/fd")
    own = {os.readlink(f"/proc/{env.server_pid}/fd/{fd}") for fd in fds}
    assert not {f"socket:[{i}]" for i in inodes} & own, "the server holds a listening TCP socket"


def test_same_seed_same_suite(suite, tmp_path):
    """A rebuild with the seed gives byte-identical task files (specs, DB changes, ground truth)."""
    python, root, _ = suite
    subprocess.run([python, BUILD_SCRIPT, "--root", str(tmp_path)], check=True,
                   capture_output=True)
    old, new = os.path.join(root, "data"), os.path.join(tmp_path, "data")
    for sub in ("tasks", "datasets"):
        r = subprocess.run(["diff", "-r", "-q", os.path.join(old, sub), os.path.join(new, sub)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[:2000]


def test_episode_through_make_env(suite):
    e = make_env("appworld-synth")
    try:
        task_id = list_tasks("appworld-synth", "test_challenge")[0]
        obs = e.reset(task_id)
        assert obs.instruction and obs.supervisor.email.endswith("@example.com")
        out = e.step("print(apis.api_docs.show_api_descriptions(app_name='file_system'))").output
        assert "create_file" in out
        assert "password" in e.step("print(apis.supervisor.show_account_passwords())").output
    finally:
        e.close()


def test_main_job_preset_runs_an_iteration(suite, tmp_path):
    """`python -m experiments.appworld_loop --preset appworld-synth`, cut to one small
    iteration: warm start on ground-truth demonstrations through the real engine, evaluation
    before and after, one LOOP iteration, the run folder's files."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.appworld_loop", "--preset", "appworld-synth",
           f"--run_dir={run_dir}", "--iterations=1", "--tasks_per_iteration=2",
           "--rollouts_per_task=2", "--sft_steps=3", "--max_eval_tasks=2", "--eval_every=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "test_challenge" in r.stdout and "iteration 1" in r.stderr
    for name in ("metrics.jsonl", "trajectories.html", "before_after.txt"):
        assert (run_dir / name).is_file(), name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

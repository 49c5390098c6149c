"""The AppWorld adapter against a fake AppWorld environment server that speaks the real protocol.

The fake (below) serves GET / and POST /initialize, /execute, /task_completed, /evaluate, /close
with the JSON bodies and {"output": ...} replies of AppWorld's appworld/serve/environment.py, over
task folders laid out as AppWorld's data/ (datasets/<split>.txt, tasks/<id>/specs.json,
tasks/<id>/ground_truth/metadata.json and answer.json). It runs either as a subprocess
(`python tests/test_appworld.py --port N --root R`, what the adapter manages, kills and restarts)
or in a thread (an external server_url). Its apis: notes.add/list, supervisor.complete_task, and
debug.crash / hang / server_pid to break it on purpose.

The real engine is tested in tests/test_appworld_engine.py; this fake stays for faults the real
one cannot be made to show (a cell that kills the server, a replay that prints something else).
"""
import contextlib
import http.server
import io
import json
import os
import signal
import sys
import threading
import time
import types

if __name__ == "__main__":  # the fake server subprocess: stdlib only, nothing else imported below
    pass
else:
    import importlib.util

    import pytest

    from loopjax.envs import list_tasks, make_env, scenario_id
    from loopjax.envs.appworld import (
        AppWorldEnv,
        AppWorldError,
        AppWorldUnavailable,
        appworld_task_ids,
        goal_completion,
    )
    from loopjax.envs.base import EvalResult, StepResult

THIS_FILE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------- the fake server


class _FakeWorld:
    def __init__(self, root, task_id):
        task_dir = os.path.join(root, "data", "tasks", task_id)
        with open(os.path.join(task_dir, "specs.json")) as f:
            self.specs = json.load(f)
        self.task_dir, self.task_id = task_dir, task_id
        self.notes, self.answer, self.completed = [], None, False

        def complete_task(answer=None):
            self.answer, self.completed = answer, True

        def hang(seconds):
            time.sleep(seconds)

        apis = types.SimpleNamespace(
            notes=types.SimpleNamespace(add=self.notes.append, list=lambda: list(self.notes)),
            supervisor=types.SimpleNamespace(complete_task=complete_task),
            debug=types.SimpleNamespace(crash=lambda: os._exit(3), hang=hang, server_pid=os.getpid))
        self.namespace = {"apis": apis}

    def execute(self, code):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(code, "<python-input>", "exec"), self.namespace)
        except Exception as e:  # noqa: BLE001 (AppWorld reports any error as text)
            return f"Execution failed. Traceback:\n{type(e).__name__}: {e}"
        return buf.getvalue() or "Execution successful."

    def evaluate(self):
        gt = os.path.join(self.task_dir, "ground_truth")
        with open(os.path.join(gt, "answer.json")) as f:
            answer = json.load(f)
        with open(os.path.join(gt, "metadata.json")) as f:
            meta = json.load(f)
        checks = [("the answer given to complete_task is correct", str(self.answer) == str(answer))]
        checks += [(f"note {n!r} was added", n in self.notes) for n in meta["expected_notes"]]
        checks.append(("no other notes were added", set(self.notes) <= set(meta["expected_notes"])))
        passes = [{"requirement": r, "label": "no_op_fail"} for r, ok in checks if ok]
        failures = [{"requirement": r, "trace": "AssertionError", "label": "no_op_fail"}
                    for r, ok in checks if not ok]
        return {"success": not failures, "difficulty": meta["difficulty"], "num_tests": len(checks),
                "passes": passes, "failures": failures}


def make_handler(root):
    state = {"world": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code, obj):
            data = json.dumps(obj).encode() if code == 200 else b"Internal Server Error"
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(200, {"message": "Welcome to AppWorld Server! (fake)"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, world = self.path.strip("/"), state["world"]
            try:
                if method == "initialize":
                    state["world"] = world = _FakeWorld(root, body["task_id"])
                    s = world.specs
                    out = {"task_id": body["task_id"], "instruction": s["instruction"],
                           "supervisor": s["supervisor"], "datetime": s["datetime"]}
                    return self._reply(200, {"output": out})
                if world is None or world.task_id != body["task_id"]:
                    raise RuntimeError("AppWorld has not been initialized for this task.")
                out = {"execute": lambda: world.execute(body["code"]),
                       "task_completed": lambda: world.completed,
                       "evaluate": world.evaluate, "close": lambda: None}[method]()
                self._reply(200, {"output": out})
            except Exception:  # noqa: BLE001 (FastAPI's plain 500 on a handler error)
                self._reply(500, None)

    return Handler


def serve_in_thread(root):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=False))
    http.server.ThreadingHTTPServer(("127.0.0.1", int(args["--port"])),
                                    make_handler(args["--root"])).serve_forever()
    sys.exit(0)


# ----------------------------------------------------------------------------- fixtures

FAKE_COMMAND = (sys.executable, THIS_FILE, "--port", "{port}", "--root", "{root}")
TASKS = {  # task id -> (difficulty, answer, expected notes)
    "aaa1111_1": (1, "42", ["milk"]), "aaa1111_2": (1, "7", ["eggs"]),
    "bbb2222_1": (2, "x", []), "ccc3333_1": (3, "y", []), "ddd4444_1": (1, "z", []),
}


@pytest.fixture(scope="module")
def aw_root(tmp_path_factory):
    """An AppWorld data/ folder in AppWorld's own layout, with five small tasks."""
    root = tmp_path_factory.mktemp("appworld_root")
    datasets = root / "data" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / "train.txt").write_text("aaa1111_1\naaa1111_2\nbbb2222_1:some_tag\nccc3333_1\n\n")
    (datasets / "dev.txt").write_text("ddd4444_1\n")
    (datasets / "test_normal.txt").write_text("")
    (datasets / "test_challenge.txt").write_text("")
    for task_id, (difficulty, answer, notes) in TASKS.items():
        gt = root / "data" / "tasks" / task_id / "ground_truth"
        gt.mkdir(parents=True)
        (gt.parent / "specs.json").write_text(json.dumps({
            "instruction": f"Do task {task_id}.", "datetime": "2023-05-18T12:00:00",
            "supervisor": {"first_name": "Ann", "last_name": "Lee", "email": "ann@x.com",
                           "phone_number": "5550001"}, "db_version": "0.1.0"}))
        (gt / "metadata.json").write_text(json.dumps({"difficulty": difficulty,
                                                       "expected_notes": notes}))
        (gt / "answer.json").write_text(json.dumps(answer))
    return str(root)


@pytest.fixture
def make_fake_env(aw_root):
    envs = []

    def make(**options):
        env = AppWorldEnv(root=aw_root, server_command=FAKE_COMMAND, startup_timeout_s=30,
                          **options)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _wait_dead(pid):
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


def _solve(env, task_id="aaa1111_1"):
    env.reset(task_id)
    _, answer, notes = TASKS[task_id]
    for n in notes:
        env.step(f"apis.notes.add({n!r})")
    assert env.step(f"apis.supervisor.complete_task(answer={answer!r})").done
    return env.evaluate()


# ----------------------------------------------------------------------------- tests


def test_splits_difficulty_and_scenarios(aw_root, monkeypatch):
    monkeypatch.setenv("APPWORLD_ROOT", aw_root)
    assert list_tasks("appworld", "train") == ["aaa1111_1", "aaa1111_2", "bbb2222_1", "ccc3333_1"]
    paper = ["aaa1111_1", "aaa1111_2", "bbb2222_1"]
    assert list_tasks("appworld", "train:difficulty=1,2") == paper
    assert list_tasks("appworld", "paper_train") == paper
    assert list_tasks("appworld", "train:difficulty=3") == ["ccc3333_1"]
    assert (list_tasks("appworld", "dev") == ["ddd4444_1"]
            and list_tasks("appworld", "test_normal") == [])
    with pytest.raises(ValueError, match="test_challenge"):
        list_tasks("appworld", "validation")
    with pytest.raises(ValueError, match="difficulty"):
        list_tasks("appworld", "train:difficulty=easy")
    assert scenario_id("aaa1111_2") == "aaa1111"


def test_goal_completion_as_appworld_computes_it():
    ok = EvalResult(1, ("t",), (), 1.0, True)
    results = {"a_1": ok, "a_2": True, "a_3": True, "b_1": True, "b_2": False, "c_1": False}
    # TGC: 4 of 6 tasks; SGC: scenario a only of a, b, c.
    assert goal_completion(results) == {"task_goal_completion": 66.7,
                                        "scenario_goal_completion": 33.3}
    with pytest.raises(ValueError):
        goal_completion({})


def test_reset_step_evaluate_close(make_fake_env):
    env = make_fake_env()
    obs = env.reset("aaa1111_1")
    assert (obs.task_id, obs.instruction, obs.date, obs.world) == (
        "aaa1111_1", "Do task aaa1111_1.", "2023-05-18", "appworld")
    assert obs.supervisor.name == "Ann Lee" and "spotify" in obs.apps and "admin" not in obs.apps
    assert env.step("x = 2\nprint(x + 1)").output == "3\n"
    assert env.step("print(x)").output == "2\n"  # variables persist across cells
    assert env.step("apis.notes.add('milk')") == StepResult("Execution successful.", False)
    assert env.step("1 / 0").output.startswith("Execution failed")
    res = env.step("apis.supervisor.complete_task(answer='42')")
    assert res.done and env.step("print(1)").done
    ev = env.evaluate()
    assert (ev.num_tests, ev.reward, ev.success, ev.failures) == (3, 1.0, True, ())
    assert env.last_evaluation["difficulty"] == 1

    # The next episode on the same server: a wrong answer fails one test of three.
    env.reset("aaa1111_2")
    assert env.step("print(apis.notes.list())").output == "[]\n"  # a fresh world
    env.step("apis.notes.add('eggs')")
    env.step("apis.supervisor.complete_task(answer='8')")
    ev = env.evaluate()
    assert ev.num_tests == 3 and ev.reward == pytest.approx(2 / 3) and not ev.success
    assert ev.failures == ("the answer given to complete_task is correct",)
    with pytest.raises(ValueError, match="unknown AppWorld task"):
        env.reset("zzz_1")
    pid = env.server_pid
    env.close()
    assert env.server_pid is None
    _wait_dead(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_server_killed_mid_episode_is_replayed(make_fake_env):
    env = make_fake_env()
    env.reset("aaa1111_1")
    env.step("apis.notes.add('milk')")
    env.step("y = 5")
    pid = env.server_pid
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    # The restarted server re-ran both cells: the note exists once and y is defined again.
    assert env.step("print(len(apis.notes.list()), y)").output == "1 5\n"
    assert env.server_pid != pid and env.total_restarts == 1 and env.failure is None
    assert env.step("apis.supervisor.complete_task(answer='42')").done
    os.kill(env.server_pid, signal.SIGKILL)  # a crash right before evaluation is recovered too
    ev = env.evaluate()
    assert ev.success and ev.reward == 1.0 and env.total_restarts == 2


def test_crashing_cell_records_failure_and_run_goes_on(make_fake_env):
    env = make_fake_env(max_restarts=1)
    env.reset("aaa1111_1")
    env.step("apis.notes.add('milk')")
    res = env.step("apis.debug.crash()")  # kills the server each time it runs
    assert res.done and res.output.startswith("Environment failure")
    assert "failed 2 time(s)" in env.failure
    assert env.step("print(1)").done
    ev = env.evaluate()
    assert (ev.num_tests, ev.reward, ev.success) == (0, 0.0, False)
    assert ev.failures[0].startswith("environment failure")
    # The next episode starts clean, on a new server.
    assert _solve(env).success and env.failure is None


def test_replay_divergence_records_failure(make_fake_env):
    env = make_fake_env()
    env.reset("aaa1111_1")
    env.step("print(apis.debug.server_pid())")  # prints something a new server cannot reproduce
    os.kill(env.server_pid, signal.SIGKILL)
    assert env.step("print(1)").done and "replaying cell 0" in env.failure


def test_hung_server_times_out(make_fake_env):
    env = make_fake_env(max_restarts=1, execute_timeout_s=1.0)
    env.reset("aaa1111_1")
    assert env.step("apis.debug.hang(60)").done and "timed out" in env.failure
    assert _solve(env).success


def test_external_server_url(aw_root):
    server, url = serve_in_thread(aw_root)
    env = make_env("appworld", server_url=url, root=aw_root)
    try:
        assert _solve(env).success and env.server_pid is None
        env.reset("aaa1111_1")
        server.shutdown()
        server.server_close()
        # An external server is never restarted: the episode is recorded as failed.
        assert env.step("print(1)").done and env.failure is not None
    finally:
        env.close()


def test_missing_appworld_is_explained(aw_root, tmp_path, monkeypatch):
    for var in ("APPWORLD_ROOT", "APPWORLD_PYTHON", "APPWORLD_SERVER_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOOPJAX_APPWORLD_HOME", str(tmp_path / "no-setup-here"))
    for call in (lambda: list_tasks("appworld", "train"), lambda: make_env("appworld"),
                 lambda: list_tasks("appworld-synth", "train")):
        with pytest.raises(AppWorldUnavailable) as e:
            call()
        for command in ("APPWORLD_ROOT", "APPWORLD_PYTHON",
                        "python -m loopjax.envs.appworld_setup"):
            assert command in str(e.value)
    with pytest.raises(AppWorldUnavailable, match="holds no AppWorld data"):
        make_env("appworld", root=str(tmp_path))
    with pytest.raises(ValueError,
                       match=r"unknown AppWorld split 'nope'.*has \['dev', 'test_challenge'"):
        appworld_task_ids("nope", aw_root)

    with pytest.raises(AppWorldUnavailable, match="(?s)set APPWORLD_PYTHON.*appworld_setup"):
        AppWorldEnv(root=aw_root).reset("aaa1111_1")
    with pytest.raises(AppWorldUnavailable, match="not an executable"):
        AppWorldEnv(root=aw_root, python=str(tmp_path / "nope")).reset("aaa1111_1")
    if importlib.util.find_spec("appworld") is None:
        with pytest.raises(AppWorldUnavailable, match="cannot import appworld"):
            AppWorldEnv(root=aw_root, python=sys.executable).reset("aaa1111_1")
    env = AppWorldEnv(root=aw_root, server_command=(sys.executable, "-c", "print('boom'); exit(2)"))
    with pytest.raises(AppWorldError, match="did not start(.|\n)*boom"):
        env.reset("aaa1111_1")
    env.close()

"""The replay that restores variables after a crash has a budget of its own.

After a cell times out (or kills its worker), the episode's earlier cells are replayed in a fresh
worker before the next cell runs. The replay gets `sandbox.replay_budget` of the cells' recorded
run times; the next cell still gets its whole `time_limit_s`, so slow earlier cells never make a
quick cell time out. A replay past its budget ends the episode as an environment failure (not a
time-out charged to the agent). The cells sleep (`import time`: the test-only worker mode without
the Python-level checks), with a 1 s limit to keep the tests short.
"""
import pytest

from loopjax.envs import list_tasks, make_env, sandbox

LIMIT_S = 1.0
TASK = list_tasks("miniworld-tiny", "train")[0]  # any task: these cells never solve it
TIMES_OUT = "while True: pass"


def slow(seconds, name, value):
    return f"import time\ntime.sleep({seconds})\n{name} = {value}"


@pytest.fixture(scope="module")
def env():
    e = make_env("miniworld-tiny", time_limit_s=LIMIT_S, python_checks=False)
    yield e
    e.close()


@pytest.mark.parametrize("after", ["print(a)", slow(0.5 * LIMIT_S, "b", 0) + "\nprint(a)"],
                         ids=["trivial", "half_the_limit"])
def test_a_slow_cell_s_replay_leaves_the_next_cell_its_limit(env, after):
    """A cell that sleeps most of the limit, then one that times out: the cell after them runs
    within its own limit (old: the replay of the slow cell used up its deadline)."""
    env.reset(TASK)
    assert env.step(slow(0.9 * LIMIT_S, "a", 7)).output == "Execution successful."
    res = env.step(TIMES_OUT)
    assert "TimeoutError" in res.output and "restored" in res.output, res.output
    res = env.step(after)
    assert res.output == "7" and not res.done, res.output


def test_slow_cells_past_one_limit_are_all_restored(env):
    """Four cells of 0.6 limits each (2.4 limits in all) after a crash: every variable is back and
    the next cell runs (old: the replay ran out in the second cell and the next cell timed out)."""
    env.reset(TASK)
    for i in range(4):
        env.step(slow(0.6 * LIMIT_S, f"v{i}", i))
    assert "restored" in env.step("import os\nos._exit(1)").output
    res = env.step("print(sorted(k for k in globals() if k[0] == 'v'))")
    assert res.output == "['v0', 'v1', 'v2', 'v3']", res.output
    assert env.failure is None and env.evaluate().num_tests > 0


def test_a_replay_past_its_budget_ends_the_episode(env, monkeypatch):
    """The replay runs past its budget (capped here below one replayed cell's time): the episode
    ends as an environment failure with the reason, the agent's next cell is never run, and
    evaluation says so; the next episode starts clean."""
    monkeypatch.setattr(sandbox, "REPLAY_CAP_S", 0.3 * LIMIT_S)
    env.reset(TASK)
    env.step(slow(0.6 * LIMIT_S, "a", 1))
    assert "TimeoutError" in env.step(TIMES_OUT).output
    calls = env.world.num_calls
    res = env.step("apis.notes.create_note(title='t', content='c')\nprint('ran')")
    assert res.done and res.output.startswith("Environment failure:"), res.output
    assert "budget" in res.output and "TimeoutError" not in res.output, res.output
    assert env.world.num_calls == calls  # the cell never ran
    assert env.failure and env.step("print(1)").output == res.output
    ev = env.evaluate()
    assert not ev.success and ev.reward == 0.0 and "environment failure" in ev.failures[0]
    env.reset(TASK)
    assert env.failure is None and env.step("print(6 * 7)").output == "42"

"""MiniWorldEnv: one miniworld episode at a time, agent code run in the sandbox worker."""
from __future__ import annotations

from loopjax.envs.base import EvalResult, Observation, StepResult, Supervisor
from loopjax.envs.miniworld import data, tasks
from loopjax.envs.miniworld.evaluator import Outcome, run_tests
from loopjax.envs.miniworld.framework import ApiError
from loopjax.envs.miniworld.world import World, copy_state
from loopjax.envs.sandbox import HandlerError, Sandbox, SandboxLimits

MAX_NEW_RECORDS = 200  # records an episode may add to the world (a cap on the state's growth)


def _num_records(state: dict) -> int:
    return sum(len(table) for app in state.values() for table in app.values())


class MiniWorldEnv:
    """The Env protocol over a miniworld preset.

    Options: `limits` (SandboxLimits) or its fields as keywords (time_limit_s=10.0, memory_mb=...).
    The world's growth in one episode is capped: once it holds MAX_NEW_RECORDS more records than
    at the start, every further app API call fails with an ApiError that says so (the size of
    what one call and one episode may send is capped by the sandbox's limits).

    When the sandbox cannot go on with an episode (the replay that restores variables after a
    crash failed or ran past its budget), `failure` says why, the step ends the episode and
    evaluate() gives reward 0 with the reason: an environment failure, which the collector
    records on the episode (the trainer leaves such episodes out of the update).
    """

    def __init__(self, preset: tasks.Preset, limits: SandboxLimits | None = None, **limit_kw):
        self.preset = preset
        self._base_records = 0
        self.sandbox = Sandbox(limits or SandboxLimits(**limit_kw))
        self.world: World | None = None
        self.task_id: str | None = None
        self._initial: dict | None = None
        self._spec = None
        self.done = False
        self.failure: str | None = None

    # -- Env protocol ---------------------------------------------------------------------------
    def reset(self, task_id: str) -> Observation:
        state, spec = tasks.build_task(self.preset, task_id)
        people, _ = tasks.base_state(self.preset)
        self._initial, self._spec, self.task_id, self.done = copy_state(state), spec, task_id, False
        self.failure = None
        self.world = World(tasks.apps_of(self.preset), state, people, self.preset.auth)
        self._base_records = _num_records(state)
        self.sandbox.reset()
        sup = people[0]
        return Observation(task_id, spec.instruction,
                           Supervisor(sup["first_name"], sup["last_name"], sup["email"],
                                      sup["phone_number"]),
                           data.TODAY, tuple(self.world.apps), self.preset.name)

    def step(self, code: str) -> StepResult:
        """Run one cell of agent code; done once complete_task has been called."""
        self._need_episode()
        if self.done and self.failure is None:
            return StepResult("The task is already completed; the episode is over.", True)
        result = self.sandbox.run(code, self._handle) if self.failure is None else None
        if self.failure is not None or result.failure is not None:
            self.failure = self.failure or result.failure
            self.done = True
            return StepResult(f"Environment failure: {self.failure}. The episode is over.", True)
        self.done = self.world.completed
        return StepResult(result.observation(), self.done)

    def evaluate(self) -> EvalResult:
        """Unit tests over the final state (see evaluator.py)."""
        self._need_episode()
        if self.failure is not None:
            return EvalResult(0, (), (f"environment failure: {self.failure}",), 0.0, False)
        spec, world = self._spec, self.world
        outcome = Outcome(self._initial, world.state,
                          None if not world.completed else world.answer, world.completed)
        n, passes, failures = run_tests(spec.checks, spec.allow, spec.answer, outcome)
        return EvalResult(n, tuple(passes), tuple(failures), len(passes) / n, not failures)

    def close(self) -> None:
        self.sandbox.close()

    # -- helpers --------------------------------------------------------------------------------
    def ground_truth(self, task_id: str) -> list[str]:
        return tasks.ground_truth(self.preset, task_id)

    @property
    def instruction(self) -> str:
        self._need_episode()
        return self._spec.instruction

    def _handle(self, app: str, api: str, kwargs: dict):
        if app != "api_docs" and _num_records(self.world.state) - self._base_records \
                >= MAX_NEW_RECORDS:
            raise HandlerError(f"Response status code is 429: this episode has added "
                               f"{MAX_NEW_RECORDS} records to the world, the most one episode "
                               "may add; no further calls are accepted")
        try:
            return self.world.call(app, api, kwargs)
        except ApiError as e:
            raise HandlerError(e.render()) from None
        except Exception as e:  # an odd argument reaching a handler must not crash the trainer
            raise HandlerError(f"Response status code is 500: internal error "
                               f"({type(e).__name__}) in {app}.{api}") from None

    def _need_episode(self) -> None:
        if self.world is None:
            raise RuntimeError("call reset(task_id) before step() or evaluate()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

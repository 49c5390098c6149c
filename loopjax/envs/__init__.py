"""Environments: the Env protocol, the world registry, miniworld and the sandboxed REPL.

    from loopjax.envs import make_env, list_tasks, ground_truth, scenario_id
"""
from loopjax.envs.base import (
    Env,
    EvalResult,
    Observation,
    StepResult,
    Supervisor,
    WorldEntry,
    scenario_id,
)
from loopjax.envs.registry import demonstration, ground_truth, list_tasks, make_env, register_world

__all__ = ["Env", "EvalResult", "Observation", "StepResult", "Supervisor", "WorldEntry",
           "demonstration", "ground_truth", "list_tasks", "make_env", "register_world",
           "scenario_id"]

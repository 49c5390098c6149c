"""The registry of worlds: world name -> WorldEntry, and the calls that dispatch through it.

    from loopjax.envs import make_env, list_tasks, register_world

The built-in worlds are registered here: miniworld's presets (miniworld exports its table of
entries; it does not register itself) and "appworld", whose adapter is imported on first use
because the real AppWorld is optional, and "appworld-synth": the same adapter on the
AppWorld-format task suite that `python -m loopjax.envs.appworld_setup` builds offline. A user's
world joins with `register_world(name, WorldEntry(...))`.
"""
from __future__ import annotations

from loopjax.envs import miniworld
from loopjax.envs.base import Env, EpisodeRecord, WorldEntry
from loopjax.envs.behaviour import api_behaviour


def _appworld_env(**options) -> Env:  # imported on use: AppWorld is optional
    from loopjax.envs.appworld import AppWorldEnv  # noqa: PLC0415
    return AppWorldEnv(**options)


def _appworld_tasks(split: str) -> list[str]:
    from loopjax.envs.appworld import appworld_task_ids  # noqa: PLC0415
    return appworld_task_ids(split)


def _appworld_solution(task_id: str) -> list[str]:
    from loopjax.envs.appworld import solution_cells  # noqa: PLC0415
    return solution_cells(task_id)


def _synth_env(**options) -> Env:
    from loopjax.envs.appworld import AppWorldEnv, synth_installation  # noqa: PLC0415
    python, root = synth_installation()
    return AppWorldEnv(**{"root": root, "python": python, **options})


def _synth_tasks(split: str) -> list[str]:
    from loopjax.envs.appworld import appworld_task_ids, synth_installation  # noqa: PLC0415
    return appworld_task_ids(split, synth_installation()[1])


def _synth_solution(task_id: str) -> list[str]:
    from loopjax.envs.appworld import solution_cells, synth_installation  # noqa: PLC0415
    return solution_cells(task_id, synth_installation()[1])


_WORLDS: dict[str, WorldEntry] = {  # the registry: world name -> entry
    **miniworld.WORLDS,
    # AppWorld's engine on APPWORLD_ROOT's data (AppWorld's own, or any AppWorld-format root)
    # (AppWorld's API names are the ones loopjax.envs.behaviour reads)
    "appworld": WorldEntry(_appworld_env, _appworld_tasks, _appworld_solution,
                           behaviour=api_behaviour(_appworld_solution)),
    # the same engine and adapter on the suite `python -m loopjax.envs.appworld_setup` built
    "appworld-synth": WorldEntry(_synth_env, _synth_tasks, _synth_solution,
                                 behaviour=api_behaviour(_synth_solution))}


def register_world(name: str, entry: WorldEntry) -> None:
    _WORLDS[name] = entry


def _entry(world: str) -> WorldEntry:
    if world not in _WORLDS:
        raise ValueError(f"unknown world {world!r}; known worlds: {sorted(_WORLDS)}")
    return _WORLDS[world]


def make_env(world: str = "miniworld", **options) -> Env:
    """A new environment of `world` ("miniworld", "miniworld-tiny", "appworld", ...)."""
    return _entry(world).make_env(**options)


def list_tasks(world: str, split: str) -> list[str]:
    """Task ids of a split: "train", "dev", "test_normal" or "test_challenge"."""
    return _entry(world).list_tasks(split)


def ground_truth(task_id: str, world: str = "miniworld") -> list[str]:
    """The scripted solution of a task: one code string per turn."""
    entry = _entry(world)
    if entry.ground_truth is None:
        raise NotImplementedError(f"world {world!r} has no ground-truth solutions")
    return entry.ground_truth(task_id)


def episode_behaviour(world: str, record: EpisodeRecord) -> dict[str, float]:
    """The world's behaviour measures of one episode ({} for a world without them, or one that
    is not registered: a user's own Env driven by the collector directly)."""
    entry = _WORLDS.get(world)
    return {} if entry is None or entry.behaviour is None else entry.behaviour(record)


def demonstration(task_id: str, world: str, *, lookup: bool = True,
                  paging: bool = True) -> list[tuple[str, str]]:
    """A scripted agent's turns as (code it writes, code the world runs): `lookup` = it reads the
    API docs first (else it writes remembered, outdated API names), `paging` = it reads every
    page of a list (else the first)."""
    entry = _entry(world)
    if entry.demonstration is None:
        if not (lookup and paging):
            raise NotImplementedError(f"world {world!r} has no careless demonstrations")
        return [(code, code) for code in ground_truth(task_id, world)]
    return entry.demonstration(task_id, lookup=lookup, paging=paging)

"""miniworld: an AppWorld-like multi-app world that runs anywhere (no download).

Presets: "miniworld-tiny" (phone, notes, payments; no logins; short tasks a from-scratch CPU model
can learn) and "miniworld" (all apps, logins, dozens of APIs). Use it through loopjax.envs:

    from loopjax.envs import make_env, list_tasks, ground_truth
    env = make_env("miniworld-tiny")
    obs = env.reset(list_tasks("miniworld-tiny", "train")[0])
"""
from loopjax.envs.base import WorldEntry
from loopjax.envs.behaviour import api_behaviour
from loopjax.envs.miniworld.env import MiniWorldEnv
from loopjax.envs.miniworld.tasks import PRESETS, Preset, demonstration, ground_truth, task_ids

__all__ = ["MiniWorldEnv", "PRESETS", "Preset", "WORLDS"]


def _entry(preset: Preset) -> WorldEntry:
    return WorldEntry(
        make_env=lambda **options: MiniWorldEnv(preset, **options),
        list_tasks=lambda split: task_ids(preset, split),
        ground_truth=lambda task_id: ground_truth(preset, task_id),
        demonstration=lambda task_id, **habits: demonstration(preset, task_id, **habits),
        behaviour=api_behaviour(lambda task_id: ground_truth(preset, task_id)))


# One world per preset ("miniworld-tiny", "miniworld", ...), registered by loopjax.envs.registry.
WORLDS: dict[str, WorldEntry] = {preset.name: _entry(preset) for preset in PRESETS.values()}

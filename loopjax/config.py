"""Every knob of a run as frozen dataclasses, validated up front, with presets and CLI overrides.

    config = resolve("miniworld-tiny", ["--iterations=20", "--update.learning_rate=1e-3"])

Nested fields are addressed with dots (`--update.clip_form=paper`); values are parsed by the
field's type (`none` for None, comma-separated tuples). Presets live in experiments/presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

from loopjax.loop.epochs import EpochConfig
from loopjax.loop.update import UpdateConfig
from loopjax.models.lora import LoraConfig

WARM_STARTS = ("none", "sft", "rft")


@dataclasses.dataclass(frozen=True)
class ScratchModel:
    """The small policy trained from scratch when no --model folder is given."""
    vocab_size: int = 768  # SentencePiece vocabulary trained on the world's own text
    hidden_size: int = 128  # D
    intermediate_size: int = 384  # F
    num_layers: int = 3  # L
    num_heads: int = 4  # H
    num_kv_heads: int = 2  # Hk
    head_dim: int = 32  # Dh


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- where and what
    env: str = "miniworld-tiny"  # world: miniworld-tiny | miniworld | appworld
    model: str = ""  # local Hugging Face folder; "" = train a tokenizer and a small model from scratch
    run_dir: str = "runs/miniworld-tiny"  # metrics, events, checkpoints, report files
    train_split: str = "train"  # tasks LOOP samples from (appworld: "paper_train" = train difficulty 1-2)
    seed: int = 0  # every PRNG key of the run derives from this
    mesh: str = "1,-1,1"  # devices as data,fsdp,tensor (-1 = the rest)
    multihost: bool = False  # one JAX process per host (jax.distributed.initialize; off TPU set JAX_COORDINATOR_ADDRESS etc.)
    dtype: str = "float32"  # params dtype for a --model checkpoint (bfloat16 for big models)
    scratch: ScratchModel = ScratchModel()
    compact_prompt: bool = True  # short prompt without the worked example (small from-scratch models)
    # --- warm start (models that cannot act yet)
    warm_start: str = "sft"  # none | sft (ground-truth demonstrations) | rft (own successes)
    demo_careful: float = 1.0  # share of SFT demonstrators with each good habit (1 = ground truth)
    sft_steps: int = 300  # optimizer steps of supervised fine-tuning
    sft_rows: int = 8  # rows of max_seq_len tokens per SFT step, several demonstrations packed per row
    sft_learning_rate: float = 3e-3  # AdamW learning rate of the warm start
    sft_moments_to_loop: bool = False  # LOOP's AdamW starts from the SFT's second moments (warm_start=sft/rft)
    rft_rounds: int = 2  # rounds of rejection-sampling fine-tuning (warm_start=rft)
    # --- LOOP
    iterations: int = 20  # LOOP iterations
    tasks_per_iteration: int = 16  # G tasks sampled from the train split per iteration
    rollouts_per_task: int = 6  # K rollouts of each task
    temperature: float = 1.0  # sampling temperature of training rollouts
    update: UpdateConfig = UpdateConfig()  # the LOOP objective's knobs (baseline, filter, clip) too
    epochs: EpochConfig = EpochConfig()
    # --- episodes
    max_interactions_train: int = 40  # agent turns per training episode
    max_interactions_eval: int = 50  # agent turns per evaluation episode
    max_new_tokens: int = 1500  # tokens the agent may generate per turn
    max_seq_len: int = 32768  # a conversation ends when its context is full
    max_obs_tokens: int = 3000  # environment output is cut to this many tokens
    straggler_fraction: float = 0.9  # stop collecting once this share of rollouts finished ...
    straggler_task_fraction: float = 0.75  # ... and at least this share of each task's (1.0 = wait)
    env_workers: int = 8  # threads stepping environments while the device decodes
    overlap_env: bool = True  # decode other episodes while one's code runs (False = reproducible batches)
    # --- evaluation, checkpoints
    eval_every: int = 5  # evaluate on eval_split every N iterations (0 = only before and after)
    eval_split: str = "dev"  # held-out split for periodic evaluation
    final_splits: tuple[str, ...] = ("dev", "test_normal", "test_challenge")  # before/after table
    eval_temperature: float = 0.0  # 0 = greedy evaluation
    max_eval_tasks: int = 0  # evaluate at most this many tasks per split (0 = all)
    checkpoint_every: int = 1  # save every N iterations (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue the run in run_dir from its newest checkpoint
    num_trajectories_html: int = 24  # episodes shown in trajectories.html

    def __post_init__(self):
        if self.rollouts_per_task < 2:
            raise ValueError(f"rollouts_per_task must be >= 2 for a leave-one-out baseline, got "
                             f"{self.rollouts_per_task}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start {self.warm_start!r} must be one of {WARM_STARTS}")
        if not 0.0 <= self.demo_careful <= 1.0:
            raise ValueError(f"demo_careful must be in [0, 1], got {self.demo_careful}")
        for name in ("straggler_fraction", "straggler_task_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("iterations", "tasks_per_iteration", "max_interactions_train",
                     "max_interactions_eval", "max_new_tokens", "env_workers"):
            if getattr(self, name) < (0 if name == "iterations" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"training temperature must be > 0, got {self.temperature}")

    def check(self) -> "TrainConfig":
        """Checks between fields (run once the overrides are all applied).

        The update's behaviour log-probs are taken at the rollout temperature, so
        `update.temperature` follows `temperature` (set only one; differing values are an error)."""
        if self.update.temperature != self.temperature:
            if self.update.temperature != UpdateConfig().temperature:
                raise ValueError(
                    f"update.temperature={self.update.temperature} differs from the rollout "
                    f"temperature={self.temperature}; set --temperature only (the update follows it)")
            return dataclasses.replace(
                self, update=dataclasses.replace(self.update, temperature=self.temperature)).check()
        if self.epochs.buckets[-1] < self.max_seq_len:
            raise ValueError(f"the largest update bucket {self.epochs.buckets[-1]} must hold a whole "
                             f"conversation of max_seq_len={self.max_seq_len} tokens; add a bucket "
                             "(--epochs.buckets=...) or lower --max_seq_len")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- CLI overrides


def _parse(value: str, tp):
    """A CLI string as the dataclass field type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(value, inner[0])
    if origin is tuple:
        items = [v for v in value.split(",") if v]
        return tuple(_parse(v, args[0]) for v in items)
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if tp in (int, float, str):
        return tp(value)
    raise ValueError(f"cannot parse {value!r} as {tp}")


# Top-level spellings of fields that live in a nested config: `--baseline=rft` (README,
# benchmarks/ablation.py) is `--update.baseline=rft`, where all of LOOP's math knobs are.
ALIASES = {"baseline": "update.baseline", "normalize_std": "update.normalize_std"}


def override(config, dotted: str, value: str, _path: str = ""):
    """A copy of `config` with one (possibly nested) field set from its CLI string."""
    if not _path and isinstance(config, TrainConfig):
        dotted = ALIASES.get(dotted, dotted)
    head, _, rest = dotted.partition(".")
    full = _path + dotted
    hints = typing.get_type_hints(type(config))
    if head not in hints:
        fields = sorted(f.name for f in dataclasses.fields(config))
        raise ValueError(f"unknown option --{full}; options of {type(config).__name__}: {fields}")
    if rest:
        return dataclasses.replace(
            config, **{head: override(getattr(config, head), rest, value, f"{_path}{head}.")})
    try:
        parsed = _parse(value, hints[head])
    except ValueError as e:
        raise ValueError(f"--{full}={value}: {e}") from None
    return dataclasses.replace(config, **{head: parsed})


def apply_overrides(config, overrides: dict[str, typing.Any]):
    """Preset values (python objects or strings) applied field by field."""
    for key, value in overrides.items():
        config = override(config, key, value if isinstance(value, str) else json.dumps(value)
                          if isinstance(value, (list, dict)) else _to_cli(value))
    return config


def _to_cli(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_cli(args: list[str]) -> dict[str, str]:
    """["--a=1", "--b.c", "2", "--flag"] -> {"a": "1", "b.c": "2", "flag": "true"}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --name=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


__all__ = ["TrainConfig", "ScratchModel", "UpdateConfig", "EpochConfig", "LoraConfig", "override",
           "apply_overrides", "parse_cli"]

"""Every knob of a run as frozen dataclasses, validated up front, with CLI overrides.

    config = apply_overrides(TrainConfig(), parse_cli(["--iterations=20", "--update.clip_eps=0.2"]))

The defaults ARE the default run (`python -m experiments.appworld_loop`: a small policy trained
from scratch on miniworld-tiny); the presets in experiments/presets.py are diffs from them. Nested
fields are addressed with dots (`--update.clip_form=paper`); values are parsed by the field's type
(`none` for None, comma-separated tuples). What nobody should set is a constant of the module that
uses it (the sampler's page size and decode chunk, the guards' limits, the report's sizes).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing

WARM_STARTS = ("none", "sft", "rft")
# LOOP's vocabulary (loopjax/loop/objective.py's docstring defines each)
BASELINES = ("leave_one_out", "leave_none_out", "rft")
REWARDS = ("tests", "success")
LEVELS = ("token", "turn", "trajectory")
CLIP_FORMS = ("reference", "paper", None)
# The projections of a transformer block, as Hugging Face names them (LoRA targets)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Padded lengths T for conversations of up to 32K tokens (the paper's context): the presets of
# pretrained models (experiments/presets.py)
LONG_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # r, the adapter's rank
    alpha: float = 32.0  # scale = alpha / rank
    targets: tuple[str, ...] = PROJECTIONS  # which projections of each block get an adapter

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown or not self.targets:
            raise ValueError(f"lora targets {sorted(unknown) or '()'} invalid; choose from "
                             f"{PROJECTIONS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """LOOP's math (baseline, filter, clip, level) and the optimizer step. The paper's values,
    where the default differs, are in experiments/presets.py (learning rate 5e-5, a LoRA)."""
    level: str = "token"  # importance-weight level: token | turn | trajectory
    clip_form: str | None = "reference"  # reference [1/(1+eps),1+eps] | paper [1-eps,1+eps] | none
    clip_eps: float = 0.1  # clip width, in (0, 1)
    minibatch_size: int = 32  # rollouts per optimizer step = the fixed loss denominator M
    microbatch_size: int = 0  # rollouts per forward/backward in a step (0 = the minibatch)
    learning_rate: float = 3e-4  # constant AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 0.1  # global-norm clip (reference code 0.1; the paper says 1.0)
    baseline: str = "leave_one_out"  # leave_one_out | leave_none_out | rft (own successes, A = 1)
    normalize_std: bool = False  # divide advantages by the task's reward std (GRPO / RwNorm)
    adv_min_abs: float = 0.01  # rollouts with |A| below this are dropped (weight 0)
    adv_positive_only: bool = False  # also drop rollouts with A <= 0
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    train_full_weights: bool = True  # train every weight instead of a LoRA adapter
    lora: LoraConfig = LoraConfig()  # adapter shape when not train_full_weights
    skip_outlier_grads: bool = False  # skip steps whose grad norm is an outlier (loop/update.py)

    def __post_init__(self):
        for name, value, allowed in (("level", self.level, LEVELS),
                                     ("baseline", self.baseline, BASELINES),
                                     ("clip_form", self.clip_form, CLIP_FORMS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} must be one of {allowed}")
        if self.clip_form is not None and not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        mb = self.microbatch_size or self.minibatch_size
        if self.minibatch_size <= 0 or mb <= 0 or self.minibatch_size % mb:
            raise ValueError(f"minibatch_size {self.minibatch_size} must be a positive multiple of "
                             f"microbatch_size {self.microbatch_size}")

    @property
    def num_microbatches(self) -> int:
        return self.minibatch_size // (self.microbatch_size or self.minibatch_size)


@dataclasses.dataclass(frozen=True)
class EpochConfig:
    epochs_per_iteration: int = 2  # passes over the iteration's rollouts
    buckets: tuple[int, ...] = (512,)  # allowed padded lengths T, ascending (each its own compile)
    kl_stop: float = 20.0  # stop the iteration's remaining steps once |kl_k1| exceeds this
    pack: bool = True  # several rollouts per forward row (fewer padded tokens); False: one per row
    share_prefix: bool = False  # minibatches of whole tasks, each task's prompt held once per row

    def __post_init__(self):
        if self.epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be >= 1, got {self.epochs_per_iteration}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets {self.buckets} must be a non-empty ascending tuple")
        if self.share_prefix and not self.pack:
            raise ValueError("share_prefix packs a task's rollouts into one row: it needs "
                             "pack=True")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The sampling engine (loopjax/sampling/engine.py) of a run; its chunk and page sizes are
    the engine's own defaults."""
    max_slots: int = 64  # concurrent episodes at most (KV-cache slots, environments)
    share_prompts: bool = True  # prefix cache: prompt pages common to episodes computed once

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and value <= 0:
                raise ValueError(f"sampler.{f.name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class ScratchModel:
    """The small policy trained from scratch when no --model folder is given."""
    vocab_size: int = 1024  # SentencePiece vocabulary trained on the world's own text
    hidden_size: int = 128  # D, the model width
    intermediate_size: int = 384  # F, the MLP width
    num_layers: int = 3  # L, transformer blocks
    num_heads: int = 4  # H, query heads
    num_kv_heads: int = 2  # Hk, key/value heads
    head_dim: int = 32  # Dh, the width of a head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- where and what
    env: str = "miniworld-tiny"  # world: miniworld-tiny | miniworld | appworld
    model: str = ""  # HF folder, .gguf file or "smollm2"; "" = a small model from scratch
    run_dir: str = "runs/miniworld-tiny"  # metrics, events, checkpoints, report files
    train_split: str = "train"  # tasks LOOP samples from (appworld paper_train: difficulty 1-2)
    seed: int = 0  # every PRNG key of the run derives from this
    mesh: str = "1,-1,1"  # devices as data,fsdp,tensor (-1 = the rest)
    multihost: bool = False  # one JAX process per host (off TPU: set JAX_COORDINATOR_ADDRESS etc.)
    dtype: str = "float32"  # params dtype for a --model checkpoint (bfloat16 for big models)
    scratch: ScratchModel = ScratchModel()  # the policy's shape when no --model is given
    compact_prompt: bool = True  # short prompt without the worked example (small models)
    # --- warm start (models that cannot act yet)
    warm_start: str = "sft"  # none | sft (ground-truth demonstrations) | rft (own successes)
    demo_careful: float = 0.3  # share of SFT demonstrators with each good habit (1 = ground truth)
    sft_steps: int = 350  # optimizer steps of supervised fine-tuning
    sft_rows: int = 8  # rows of max_seq_len tokens per SFT step (demonstrations packed)
    sft_learning_rate: float = 3e-3  # AdamW learning rate of the warm start
    sft_moments_to_loop: bool = False  # LOOP's AdamW starts from the SFT's second moments
    rft_rounds: int = 2  # rounds of rejection-sampling fine-tuning (warm_start=rft)
    init_from: str = ""  # a run folder: start from its warm start and "before" evaluation
    # --- LOOP
    iterations: int = 10  # LOOP iterations
    tasks_per_iteration: int = 16  # G tasks sampled from the train split per iteration
    rollouts_per_task: int = 6  # K rollouts of each task
    temperature: float = 1.0  # sampling temperature of training rollouts
    reward: str = "tests"  # tests (share of the task's unit tests passed) | success (all passed)
    update: UpdateConfig = UpdateConfig()  # the LOOP objective (baseline, filter, clip) and AdamW
    epochs: EpochConfig = EpochConfig()  # the passes over an iteration's rollouts
    sampler: SamplerConfig = SamplerConfig()  # the sampling engine's slots and prefix cache
    # --- episodes
    max_interactions_train: int = 4  # agent turns per training episode
    max_interactions_eval: int = 4  # agent turns per evaluation episode
    max_new_tokens: int = 96  # tokens the agent may generate per turn
    max_seq_len: int = 512  # a conversation ends when its context is full
    max_obs_tokens: int = 128  # environment output is cut to this many tokens
    straggler_fraction: float = 0.9  # collection stops once this share of all rollouts finished
    straggler_task_fraction: float = 0.75  # ... and this share of each task's (1.0 = wait for all)
    env_workers: int = 8  # threads stepping environments while the device decodes
    overlap_env: bool = True  # decode while agent code runs (false: reproducible batches)
    # --- evaluation, checkpoints
    eval_every: int = 5  # evaluate on eval_split every N iterations (0 = only before and after)
    eval_split: str = "dev"  # held-out split for periodic evaluation
    final_splits: tuple[str, ...] = ("dev", "test_normal", "test_challenge")  # before/after table
    max_eval_tasks: int = 0  # evaluate at most this many tasks per split (0 = all)
    checkpoint_every: int = 1  # save every N iterations (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue the run in run_dir from its newest checkpoint

    def __post_init__(self):
        if self.rollouts_per_task < 2:
            raise ValueError(f"rollouts_per_task must be >= 2 for a leave-one-out baseline, got "
                             f"{self.rollouts_per_task}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start {self.warm_start!r} must be one of {WARM_STARTS}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward {self.reward!r} must be one of {REWARDS}")
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

    def check(self) -> TrainConfig:
        """Checks between fields (run once the overrides are all applied)."""
        if self.epochs.buckets[-1] < self.max_seq_len:
            raise ValueError(f"the largest update bucket {self.epochs.buckets[-1]} must hold a "
                             f"whole conversation of max_seq_len={self.max_seq_len} tokens; add a "
                             "bucket (--epochs.buckets=...) or lower --max_seq_len")
        if self.init_from and self.sft_moments_to_loop:
            raise ValueError("--sft_moments_to_loop applies to a run's own warm start; with "
                             "--init_from the optimizer state is that run's step-0 checkpoint's")
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


def override(config, dotted: str, value: str, _path: str = ""):
    """A copy of `config` with one (possibly nested) field set from its CLI string."""
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


def field_comments(cls) -> dict[str, str]:
    """Each field of a config class and its one-line comment in this file."""
    return dict(re.findall(r"^    (\w+): [^\n]*?  # ([^\n]*)$", inspect.getsource(cls), re.M))


def options_help(config, _prefix: str = "") -> list[str]:
    """`--name=value  comment` for every option of `config` (its values), nested ones with dots."""
    comments = field_comments(type(config))
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines += options_help(value, f"{_prefix}{f.name}.")
        else:
            lines.append(f"--{_prefix}{f.name}={_to_cli(value)}".ljust(34) + f" {comments[f.name]}")
    return lines


__all__ = ["TrainConfig", "ScratchModel", "UpdateConfig", "EpochConfig", "LoraConfig",
           "SamplerConfig", "override", "apply_overrides", "parse_cli", "options_help"]

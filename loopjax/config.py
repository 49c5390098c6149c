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

WARM_STARTS = ("none", "sft", "rft")
# LOOP's vocabulary (loopjax/loop/objective.py's docstring defines each)
BASELINES = ("leave_one_out", "leave_none_out", "rft")
LEVELS = ("token", "turn", "trajectory")
CLIP_FORMS = ("reference", "paper", None)
# The projections of a transformer block, as Hugging Face names them (LoRA targets)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # r
    alpha: float = 32.0  # scale = alpha / rank
    targets: tuple[str, ...] = PROJECTIONS  # which projections of each block get an adapter

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown or not self.targets:
            raise ValueError(f"lora targets {sorted(unknown) or '()'} invalid; choose from {PROJECTIONS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """LOOP's math (baseline, filter, clip, level) and the optimizer step."""
    level: str = "token"  # importance-weight level: token | turn | trajectory
    clip_form: str | None = "reference"  # reference [1/(1+eps), 1+eps] | paper [1-eps, 1+eps] | None
    clip_eps: float = 0.1  # clip width, in (0, 1)
    minibatch_size: int = 32  # rollouts per optimizer step = the fixed loss denominator M
    microbatch_size: int = 0  # rollouts per forward/backward inside the step (0 = the whole minibatch)
    learning_rate: float = 5e-5  # constant AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 0.1  # global-norm clip (reference code 0.1; the paper says 1.0)
    baseline: str = "leave_one_out"  # leave_one_out | leave_none_out | rft (own successes, A = 1)
    normalize_std: bool = False  # divide advantages by the task's reward std (GRPO / RwNorm)
    adv_min_abs: float = 0.01  # rollouts with |A| below this are dropped (weight 0)
    adv_positive_only: bool = False  # also drop rollouts with A <= 0
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    train_full_weights: bool = False  # train every weight instead of a LoRA adapter
    lora: LoraConfig = LoraConfig()  # adapter shape when not train_full_weights
    skip_outlier_grads: bool = False  # skip steps whose grad norm is > outlier_sigma above the mean
    outlier_sigma: float = 5.0  # how many standard deviations make an outlier
    outlier_warmup: int = 10  # accepted steps before the outlier test starts

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
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # allowed padded lengths T, ascending
    kl_stop: float = 20.0  # stop the iteration's remaining steps once |kl_k1| exceeds this
    max_nan_skips: int = 20  # more skipped (non-finite) steps than this aborts training
    pack: bool = True  # several rollouts per forward row (fewer padded tokens); False: one per row
    share_prefix: bool = False  # minibatches of whole tasks, each task's prompt held once per row

    def __post_init__(self):
        if self.epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be >= 1, got {self.epochs_per_iteration}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets {self.buckets} must be a non-empty ascending tuple")
        if self.share_prefix and not self.pack:
            raise ValueError("share_prefix packs a task's rollouts into one row: it needs pack=True")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The sampling engine (loopjax/sampling/engine.py) of a run."""
    max_slots: int = 64  # concurrent episodes at most (KV-cache slots, environments)
    decode_steps: int = 32  # tokens decoded per device call between host checks
    prefill_chunk: int = 512  # prompt tokens per prefill call (rounded to a power of 2)
    min_len_bucket: int = 64  # shortest KV length a batch is bucketed to
    share_prompts: bool = True  # prefix cache: prompt pages common to episodes computed once
    page_size: int = 32  # KV-cache positions per page (the cache grows and is shared by pages)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and value <= 0:
                raise ValueError(f"sampler.{f.name} must be positive, got {value}")


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
    epochs: EpochConfig = EpochConfig()  # the passes over an iteration's rollouts
    sampler: SamplerConfig = SamplerConfig()  # the sampling engine's batch shapes
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
        """Checks between fields (run once the overrides are all applied)."""
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


__all__ = ["TrainConfig", "ScratchModel", "UpdateConfig", "EpochConfig", "LoraConfig",
           "SamplerConfig", "override",
           "apply_overrides", "parse_cli"]

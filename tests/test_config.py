"""Presets (the paper's values), CLI overrides and up-front validation of the run config."""

import pytest

from experiments.appworld_loop import resolve
from experiments.presets import PRESETS
from loopjax.config import TrainConfig, options_help, override


def test_the_defaults_are_the_default_run():
    """`python -m experiments.appworld_loop` with no options runs TrainConfig() itself."""
    assert resolve([]) == TrainConfig() and PRESETS["miniworld-tiny"] == {}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_diffs_from_the_defaults(name):
    """Every key of a preset changes a default (no restated defaults hiding what differs)."""
    config, default = resolve([f"--preset={name}"]), TrainConfig()
    for key in PRESETS[name]:
        path = key.split(".")
        value, was = config, default
        for part in path:
            value, was = getattr(value, part), getattr(was, part)
        assert value != was, f"preset {name} restates the default {key}={was!r}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    config = resolve([f"--preset={name}"])
    assert config.run_dir.endswith(name)


def test_paper_preset_matches_the_paper():
    c = resolve(["--preset", "appworld-qwen2.5-32b"])
    u = c.update
    assert (c.env, c.train_split, c.rollouts_per_task, c.tasks_per_iteration) == (
        "appworld", "paper_train", 6, 40)
    assert (u.lora.rank, u.lora.alpha, u.learning_rate, u.weight_decay, u.max_grad_norm) == (
        16, 32.0, 5e-5, 0.01, 0.1)
    assert (u.minibatch_size, u.clip_eps, u.clip_form, u.level, u.train_full_weights) == (
        32, 0.1, "reference", "token", False)
    assert set(u.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"}
    assert (c.epochs.epochs_per_iteration, c.temperature, u.baseline, u.normalize_std) == (
        2, 1.0, "leave_one_out", False)
    assert (c.max_interactions_train, c.max_interactions_eval, c.max_new_tokens, c.max_obs_tokens,
            c.max_seq_len) == (40, 50, 1500, 3000, 32768)
    assert (c.straggler_fraction, c.straggler_task_fraction, c.update.adv_min_abs) == (
        0.9, 0.75, 0.01)


def test_overrides_parse_by_field_type():
    c = resolve(["--iterations=3", "--update.clip_form=none", "--update.lora.rank", "8",
                 "--epochs.buckets=128,256,512", "--overlap_env=false", "--resume"])
    assert c.iterations == 3 and c.update.clip_form is None and c.update.lora.rank == 8
    assert c.epochs.buckets == (128, 256, 512) and c.overlap_env is False and c.resume is True


def test_nested_fields_have_one_spelling():
    """LOOP's math knobs live in UpdateConfig only: no top-level aliases."""
    c = resolve(["--update.baseline=leave_none_out", "--update.normalize_std=true"])
    assert (c.update.baseline, c.update.normalize_std) == ("leave_none_out", True)
    for alias in ("baseline", "normalize_std"):
        with pytest.raises(ValueError, match=f"unknown option --{alias}"):
            override(TrainConfig(), alias, "true")


@pytest.mark.parametrize("knob", [
    "sampler.decode_steps", "sampler.prefill_chunk", "sampler.min_len_bucket", "sampler.page_size",
    "epochs.max_nan_skips", "update.outlier_sigma", "update.outlier_warmup", "eval_temperature",
    "num_trajectories_html"])
def test_internal_sizes_are_constants_not_options(knob):
    with pytest.raises(ValueError, match=f"unknown option --{knob}"):
        resolve([f"--{knob}=1"])


@pytest.mark.parametrize("argv, message", [
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--update.no_such=1"], "unknown option --update.no_such"),
    (["--iterations=many"], "--iterations=many"),
    (["--rollouts_per_task=1"], "rollouts_per_task must be >= 2"),
    (["--update.clip_form=sideways"], "clip_form"),
    (["--update.baseline=mean"], "baseline 'mean' must be one of"),
    (["--max_seq_len=4096"], "largest update bucket"),
    (["positional"], "unexpected argument"),
    (["--update.temperature=0.5"], "unknown option --update.temperature"),
    (["--sampler.max_slots=0"], "sampler.max_slots must be positive"),
    (["--update.lora.dropout=0.1"], "unknown option --update.lora.dropout"),
    (["--init_from=runs/x", "--sft_moments_to_loop=true"], "applies to a run's own warm start"),
    (["--reward=partial"], "reward 'partial' must be one of"),
])
def test_bad_values_get_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        resolve(argv)


def test_sampler_switch_and_slots():
    """A sampler switch may be off (only its numbers must be positive)."""
    c = resolve(["--sampler.share_prompts=false", "--sampler.max_slots=16"])
    assert c.sampler.share_prompts is False and c.sampler.max_slots == 16


def test_help_lists_every_option_with_its_comment(capsys):
    """--help prints each option's resolved value and its one-line comment (every field has one:
    a field without raises KeyError here)."""
    from experiments.appworld_loop import main  # noqa: PLC0415
    with pytest.raises(SystemExit) as exit_:
        main(["--preset=miniworld-smollm2", "--iterations=7", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "resolved config" not in out
    assert "--iterations=7 " in out and "--model=smollm2 " in out
    lines = options_help(TrainConfig())
    assert all(line.split(None, 1)[1].strip() for line in lines)
    assert len(lines) == len(set(line.split("=")[0] for line in lines)) == 70


def test_unknown_preset_exits_with_the_list():
    with pytest.raises(SystemExit, match="unknown preset"):
        resolve(["--preset=nope"])


def test_config_is_a_leaf():
    """loopjax.config imports nothing of loopjax: every module may import it."""
    import ast  # noqa: PLC0415

    import loopjax.config  # noqa: PLC0415
    tree = ast.parse(open(loopjax.config.__file__).read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("loopjax")]

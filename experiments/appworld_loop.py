"""The main job: LOOP on miniworld (the embedded default) or the real AppWorld.

    python -m experiments.appworld_loop                          # embedded default, CPU, minutes
    python -m experiments.appworld_loop --preset appworld-qwen2.5-32b --model /models/Qwen2.5-32B
    python -m experiments.appworld_loop --iterations=20 --update.clip_form=paper --resume

Options are TrainConfig fields (loopjax/config.py), nested ones with dots; `--help` lists them
with the values a preset (and the other options given) resolve to.
"""

import json
import logging
import sys

from experiments.presets import PRESETS
from loopjax.config import TrainConfig, apply_overrides, options_help, parse_cli


def resolve(argv: list[str]) -> TrainConfig:
    """TrainConfig's defaults, then the preset's diff from them (its run folder runs/<preset>),
    then the command line's options."""
    opts = parse_cli(argv)
    preset = opts.pop("preset", "miniworld-tiny")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = apply_overrides(TrainConfig(run_dir=f"runs/{preset}"), PRESETS[preset])
    return apply_overrides(config, opts).check()


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    argv = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv)
    try:
        config = resolve([a for a in argv if a not in ("-h", "--help")])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if wants_help:
        print(__doc__ + f"\n--preset=NAME: one of {sorted(PRESETS)} (default miniworld-tiny), "
              "then these options:\n  " + "\n  ".join(options_help(config)))
        raise SystemExit(0)
    print("resolved config:\n" + json.dumps(config.to_dict(), indent=2, default=str), flush=True)
    from loopjax import report, train  # noqa: PLC0415 (after the config is known to be valid)
    summary = train.run(config)
    print("\n" + report.before_after_table(summary["before"], summary["after"]))
    print(f"\nrun folder: {summary['run_dir']} (metrics.jsonl, events/, checkpoints/, "
          f"learning_curve.png, trajectories.html); {summary['wall_s']:.0f} s")
    return summary


if __name__ == "__main__":
    main()

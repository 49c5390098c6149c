"""The main job (`experiments.appworld_loop.main`) with recorders around two library calls.

    python tests/recording_worker.py OUT.json --option=value ...

Writes OUT.json: for each warm-start fine-tuning (`loopjax.warmstart.sft`), the records it trained
on; for each LOOP iteration's epoch driver (`loopjax.train.run_iteration`), the rollouts' rewards
and groups, the advantages it was given and the rollouts each update step kept. Both wrappers call
the real function with the same arguments: the run is the CLI's run, only observed.
"""

import functools
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import appworld_loop  # noqa: E402
from loopjax import train, warmstart  # noqa: E402


def _record(real, on_call):
    signature = inspect.signature(real)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        on_call(signature.bind(*args, **kwargs).arguments, out)
        return out
    return wrapper


def main():
    out_path, argv = sys.argv[1], sys.argv[2:]
    seen = {"sft": [], "iterations": []}
    seen_sft, seen_it = seen["sft"], seen["iterations"]
    warmstart.sft = _record(warmstart.sft, lambda a, out: seen_sft.append({
        "records": [{"task_id": r.task_id, "success": bool(r.success),
                     "reward": float(r.reward)} for r in a["records"]]}))
    train.run_iteration = _record(train.run_iteration, lambda a, out: seen_it.append({
        "rewards": [float(r.reward) for r in a["rollouts"]],
        "success": [bool(r.success) for r in a["rollouts"]],
        "groups": [int(r.group) for r in a["rollouts"]],
        "adv": [float(x) for x in a["adv_N"]],
        "num_rollouts": [float(h["num_rollouts"]) for h in out[1]],
        "stopped_on_kl": bool(out[1] and out[1][-1]["stopped_on_kl"])}))
    appworld_loop.main(argv)
    with open(out_path, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()

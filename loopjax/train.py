"""The outer LOOP loop: G x K rollouts, leave-one-out advantages, PPO epochs, evaluate, save.

    summary = train.run(config)      # what `python -m experiments.appworld_loop` calls

One iteration (docs/algorithm.md): sample G training tasks -> K rollouts each with the current
policy (the sampler runs on the learner's own params) -> rewards -> A_k = R_k - mean_{i != k} R_i ->
drop |A| < 0.01 -> `epochs_per_iteration` epochs of clipped-surrogate minibatch steps. The run
starts with a warm start (SFT on ground-truth demonstrations) when the policy cannot act yet and
evaluates held-out splits before LOOP and after it.

The run is plain functions over a RunState: setup -> restore | (warm_start, evaluate) ->
iteration ... -> evaluate -> reports; `run` is that loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from loopjax import episodes, memory, multihost, warmstart
from loopjax import eval as evaluation
from loopjax.checkpoint import Checkpointer, abstract_like, set_aside
from loopjax.config import TrainConfig
from loopjax.envs import Env, list_tasks, make_env
from loopjax.loop import advantages, keep_mask, split_params
from loopjax.loop.epochs import run_iteration
from loopjax.loop.update import (
    TrainState,
    UpdateStep,
    init_train_state,
    make_optimizer,
    make_update_step,
)
from loopjax.metrics import MetricsWriter, Timer, progress
from loopjax.models.config import ModelConfig
from loopjax.models.tokenizer import Tokenizer
from loopjax.policy import build_policy
from loopjax.rollout import CollectionSummary, EpisodeLimits, Rollout, ShownEpisode, collect
from loopjax.sampling.engine import SamplingEngine
from loopjax.sharding import (
    initialize_distributed,
    make_mesh,
    microbatch_sharding,
    warn_cached_cpu_collectives,
)

log = logging.getLogger("loopjax")
EVAL_TEMPERATURE = 0.0  # evaluation is greedy, so before/after and run/run compare like for like
TRAJECTORIES_HTML = 24  # evaluation episodes shown in trajectories.html


@dataclasses.dataclass
class RunState:
    """What a run holds between its phases: the policy state, the sampler, environments, writers."""
    config: TrainConfig
    mesh: Mesh
    sampler_mesh: Mesh  # this host's devices (all of them on one host)
    key: jax.Array
    is_main: bool
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_tasks: list[str]
    # the warm start's scripted agents: task id -> ([(code written, code run)], careful)
    demo: Callable[[str], tuple[list[tuple[str, str]], bool]]
    state: TrainState
    update_step: UpdateStep
    engine: SamplingEngine
    envs: list[Env]
    limits_train: EpisodeLimits
    limits_eval: EpisodeLimits
    ckpt: Checkpointer
    timer: Timer = dataclasses.field(default_factory=Timer)
    shown: list[ShownEpisode] = dataclasses.field(default_factory=list)  # for trajectories.html


def setup(config: TrainConfig) -> RunState:
    """Mesh, policy (tokenizer and model built or loaded), train state, update step, sampler,
    environments and checkpointer of a run."""
    c = config.check()
    initialize_distributed(c.multihost)
    is_main = jax.process_index() == 0
    os.makedirs(c.run_dir, exist_ok=True)
    mesh = make_mesh(c.mesh)
    warn_cached_cpu_collectives(mesh)
    key = jax.random.key(c.seed)
    demo = warmstart.scripted_agents(c.env, c.demo_careful, c.seed)
    train_tasks = list_tasks(c.env, c.train_split)
    if not train_tasks:
        raise ValueError(f"world {c.env!r} has no training tasks")
    # Other processes build their (identical) tokenizer in a folder of their own: hosts may
    # share the run folder, and process 0's files are not visible on every host.
    policy_c = c if is_main else dataclasses.replace(
        c, run_dir=os.path.join(c.run_dir, f"process{jax.process_index()}"))
    os.makedirs(policy_c.run_dir, exist_ok=True)
    tokenizer, model_config, params = build_policy(policy_c, demo, train_tasks)
    multihost.check_same("the tokenizer or model config",
                         multihost.fingerprint(tokenizer, model_config))
    state = init_train_state(model_config, c.update, params, jax.random.fold_in(key, 1), mesh)
    update_step = make_update_step(model_config, c.update, mesh, state, temperature=c.temperature)
    # Each host samples its share of the tasks on its own devices (loopjax.multihost).
    per_host = -(-c.tasks_per_iteration // jax.process_count()) * c.rollouts_per_task
    n_slots = min(c.sampler.max_slots, max(per_host, 1))
    sampler_mesh = multihost.local_mesh(mesh)
    engine = SamplingEngine(model_config, n_slots, c.max_seq_len, mesh=sampler_mesh,
                            stop_ids=sorted(tokenizer.eos_ids),
                            share_prompts=c.sampler.share_prompts)
    if is_main:
        rows = c.update.minibatch_size // c.update.num_microbatches  # per forward pass
        est = memory.estimate(engine, (state.base, state.trainable), state.opt_state,
                              memory.activation_bytes(model_config, rows * c.epochs.buckets[-1],
                                                      c.update.remat))
        log.info("memory estimate: %s", est.describe())
    limits = {split: EpisodeLimits(turns, c.max_new_tokens, c.max_seq_len, c.max_obs_tokens,
                                   c.compact_prompt)
              for split, turns in (("train", c.max_interactions_train),
                                   ("eval", c.max_interactions_eval))}
    ckpt_dir = os.path.join(c.run_dir, "checkpoints")
    if not c.resume:
        if is_main:
            set_aside(ckpt_dir)
        multihost.barrier("checkpoints set aside")
    return RunState(c, mesh, sampler_mesh, key, is_main, tokenizer, model_config, train_tasks,
                    demo, state, update_step, engine, [make_env(c.env) for _ in range(n_slots)],
                    limits["train"], limits["eval"],
                    Checkpointer(ckpt_dir, keep=c.keep_checkpoints))


def rollouts(rs: RunState, task_ids, groups, *, limits, key, temperature, desc,
             straggler=True) -> tuple[list[Rollout], CollectionSummary]:
    """Episodes of (task, group) pairs on the current policy; every process gets all of them, in
    request order."""
    c = rs.config
    mine = multihost.my_episodes(groups)  # all of them on one host
    params, lora = multihost.local_view(split_params(rs.state.trainable, rs.state.base),
                                        rs.sampler_mesh)
    with progress(len(mine), desc, enabled=rs.is_main) as bar:
        records, summary = collect(
            rs.engine, params, lora, rs.envs, rs.tokenizer, [task_ids[i] for i in mine],
            [groups[i] for i in mine], limits, indices=mine,
            key=key, temperature=temperature, workers=c.env_workers, overlap=c.overlap_env,
            straggler_fraction=c.straggler_fraction if straggler else 1.0,
            straggler_task_fraction=c.straggler_task_fraction if straggler else 1.0,
            progress=bar.update)
    return multihost.gather_rollouts(records, summary)


def evaluate(rs: RunState, split: str, tag: str, iteration: int) -> dict:
    """Greedy (EVAL_TEMPERATURE) episodes on every task of a held-out split: TGC, SGC, behaviour."""
    c = rs.config
    tasks = list_tasks(c.env, split)
    if c.max_eval_tasks:
        tasks = tasks[:c.max_eval_tasks]
    key = jax.random.fold_in(jax.random.fold_in(rs.key, 7), evaluation.split_index(split))
    with rs.timer("eval"):
        records, _ = rollouts(rs, tasks, list(range(len(tasks))), limits=rs.limits_eval, key=key,
                              temperature=EVAL_TEMPERATURE, desc=f"eval {split} ({tag})",
                              straggler=False)
    shown = max(1, TRAJECTORIES_HTML // 6)  # evenly spaced: one of several templates
    rs.shown += [ShownEpisode(r.episode, split, tag, iteration)
                 for r in records[::max(1, len(records) // shown)][:shown]]
    if rs.is_main:
        episodes.write(os.path.join(c.run_dir, episodes.FILE), records, c.env, split=split,
                       tag=tag, iteration=iteration)
    return evaluation.summarize(records, c.env)


def warm_start(rs: RunState) -> None:
    """SFT on the scripted agents' demonstrations, or RFT on the policy's own successes; LOOP's
    optimizer state starts fresh (or from the SFT's second moments) on the state's shardings."""
    c = rs.config
    if c.warm_start == "none":
        return
    if c.warm_start == "sft":
        records = warmstart.demonstrations(rs.envs[0], rs.tokenizer, rs.train_tasks, rs.demo,
                                           rs.limits_train)
    else:  # rft: the policy's own successes, sampled K times per train task
        records = []
        for r in range(c.rft_rounds):
            recs, _ = rollouts(rs, rs.train_tasks * c.rollouts_per_task,
                               list(range(len(rs.train_tasks))) * c.rollouts_per_task,
                               limits=rs.limits_train, temperature=c.temperature,
                               key=jax.random.fold_in(rs.key, 100 + r), desc="rft")
            records += [x for x in recs if x.success]
        if not records:
            log.warning("rft: no successful rollouts; skipping the warm start")
            return
    log.info("warm start (%s) on %d demonstrations, %d steps", c.warm_start, len(records),
             c.sft_steps)
    trained, sft_opt_state = warmstart.sft(
        rs.model_config, rs.state.trainable, rs.state.base, records, steps=c.sft_steps,
        rows=c.sft_rows, length=c.max_seq_len, learning_rate=c.sft_learning_rate,
        key=jax.random.fold_in(rs.key, 2), batch_sharding=microbatch_sharding(rs.mesh),
        log=lambda i, loss: log.info("sft step %d loss %.4f", i, loss))
    opt_state = make_optimizer(c.update).init(trained)
    if c.sft_moments_to_loop:
        opt_state = warmstart.with_second_moments(opt_state, sft_opt_state)
    # The new optimizer state is made outside jit: place it on the state's shardings (global
    # arrays, which a multi-host checkpoint save needs).
    placed = jax.device_put(rs.state.replace(base=None, trainable=trained, opt_state=opt_state),
                            rs.update_step.state_shardings)
    rs.state = placed.replace(base=rs.state.base)


def objective(records: list[Rollout], reward: str) -> np.ndarray:
    """What LOOP maximizes per rollout: the share of the task's unit tests passed ("tests", the
    paper's reward) or 1 for a task solved and 0 otherwise ("success": no partial credit, e.g.
    for the tests a no-op passes)."""
    return np.array([r.success if reward == "success" else r.reward for r in records], np.float32)


def iteration(rs: RunState, it: int) -> dict:
    """One LOOP iteration (docs/algorithm.md): G tasks x K rollouts, leave-one-out advantages, the
    epochs of clipped-surrogate steps; returns the iteration's metrics."""
    c, u = rs.config, rs.config.update
    G, K = c.tasks_per_iteration, c.rollouts_per_task
    key_it = jax.random.fold_in(jax.random.fold_in(rs.key, 3), it)
    # The task sampler's state is (seed, iteration): a resumed run draws the same tasks.
    rng = np.random.default_rng([c.seed, it])
    tasks = [rs.train_tasks[i] for i in
             rng.choice(len(rs.train_tasks), size=G, replace=G > len(rs.train_tasks))]
    with rs.timer("collect") as t_collect:
        records, summary = rollouts(rs, [t for t in tasks for _ in range(K)],
                                    [g for g in range(G) for _ in range(K)],
                                    limits=rs.limits_train, key=jax.random.fold_in(key_it, 0),
                                    temperature=c.temperature, desc=f"iteration {it} rollouts")
    failed = [r for r in records if r.episode.env_failure]
    if failed:  # the environment broke, not the policy: such rollouts carry no signal
        log.warning("%d rollouts dropped for environment failures, e.g. %s", len(failed),
                    failed[0].episode.env_failure)
        records = [r for r in records if not r.episode.env_failure]
    # Leave-one-out within each task, over the rollouts that finished (a task left with one
    # rollout has no baseline: A = 0).
    rewards = objective(records, c.reward)
    adv = np.asarray(advantages(rewards, u.baseline, u.normalize_std,
                                group_ids_N=np.array([r.group for r in records], np.int32)))
    with rs.timer("update") as t_update:
        rs.state, history = run_iteration(
            rs.update_step, rs.state, records, adv, jax.random.fold_in(key_it, 1), c.epochs,
            progress=lambda n: progress(n, f"iteration {it} updates", enabled=rs.is_main))
    generated = np.array([r.num_generated for r in records])
    metrics = {
        "train/reward": np.mean([r.reward for r in records]),
        "train/success": np.mean([r.success for r in records]),
        **evaluation.prefixed(evaluation.behaviour(records, c.env), "train/"),
        "train/generated_tokens": generated.mean(),
        "train/episodes_cut": summary.cut, "train/env_failures": len(failed),
        "adv/mean": adv.mean(), "adv/abs_mean": np.abs(adv).mean(), "adv/std": adv.std(),
        "adv/filtered_share": 1.0 - np.mean(keep_mask(adv, u.adv_min_abs, u.adv_positive_only)),
        "update/steps": len(history),
        "time/iteration_collect_s": t_collect.seconds, "time/iteration_update_s": t_update.seconds,
        "time/iteration_generate_s": summary.generate_s,
        "time/iteration_env_wait_s": summary.env_wait_s,
        "sampler/prefill_tokens": summary.prefill_tokens,
        "sampler/prefill_shared_tokens": summary.prefill_shared_tokens,
        "sampler/kv_peak_bytes": summary.kv_peak_bytes,
        "time/tokens_per_s": generated.sum() / max(summary.generate_s, 1e-9),
        "compiles/update": rs.update_step.num_compiles(),
        "compiles/sampler": sum(rs.engine.programs.traces.values()),
    }
    if history:
        for k in ("loss", "grad_norm", "clip_fraction", "kl_k1", "kl_k3", "rows", "T",
                  "held_tokens"):
            metrics[f"update/{k}"] = float(np.mean([h[k] for h in history]))
        metrics["update/stopped_on_kl"] = float(history[-1]["stopped_on_kl"])
        metrics["update/nan_skips"] = history[-1]["nan_skips"]
    rs.shown += [ShownEpisode(r.episode, "train", "train", it) for r in records[:2]]
    if rs.is_main:
        episodes.write(os.path.join(c.run_dir, episodes.FILE), episodes.training_sample(records),
                       c.env, split="train", tag="train", iteration=it + 1)
    return metrics


def save(rs: RunState, iteration: int, meta: dict) -> None:
    rs.ckpt.save(iteration, rs.state.replace(base=None), dict(meta, iteration=iteration))


def restore(rs: RunState) -> dict | None:
    """The newest checkpoint's meta (and rs.state := its state) when resuming; else None."""
    if not rs.config.resume or rs.ckpt.latest_step() is None:
        return None
    _, trained, meta = rs.ckpt.restore(abstract_like(rs.state.replace(base=None)))
    rs.state = trained.replace(base=rs.state.base)
    return meta


def start_from(rs: RunState, run_dir: str, logs: tuple[str, str] | None = None) -> dict:
    """rs.state := another run's warm start (its step-0 checkpoint); its "before" evaluation is
    this run's (meta, and the lines of its metrics and episodes files copied to `logs`)."""
    path = os.path.join(run_dir, "config.json")
    if os.path.abspath(run_dir) == os.path.abspath(rs.config.run_dir):
        raise ValueError(f"--init_from={run_dir} is this run's own folder (use --resume)")
    if not os.path.exists(path):
        raise ValueError(f"--init_from={run_dir}: not a run's folder (no config.json)")
    with open(path) as f:
        theirs = json.load(f)["train"]
    for name in ("env", "model", "max_seq_len", "max_interactions_eval", "compact_prompt"):
        if theirs[name] != getattr(rs.config, name):
            raise ValueError(f"--init_from={run_dir}: its {name} is {theirs[name]!r}, this run's "
                             f"{getattr(rs.config, name)!r}")
    source = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        _, trained, meta = source.restore(abstract_like(rs.state.replace(base=None)), step=0)
    finally:
        source.close()
    rs.state = trained.replace(base=rs.state.base)
    if rs.is_main and logs:
        for path, truncate in zip(logs, (evaluation.truncate_metrics, episodes.truncate),
                                  strict=True):
            shutil.copyfile(os.path.join(run_dir, os.path.basename(path)), path)
            truncate(path, 0)
    log.info("started from %s's warm start (step 0)", run_dir)
    return {"before": meta["before"], "iteration": 0, "init_from": run_dir}


def _write_config(config: TrainConfig, model_config, path: str):
    with open(path, "w") as f:
        json.dump({"train": config.to_dict(), "model": model_config.__dict__}, f, indent=2,
                  default=str)


def run(config: TrainConfig) -> dict:
    """The whole job; returns {"before": {split: summary}, "after": {...}, "run_dir": ...}."""
    c = config
    t_start = time.perf_counter()
    rs = setup(c)
    logs = os.path.join(c.run_dir, "metrics.jsonl"), os.path.join(c.run_dir, episodes.FILE)
    meta = restore(rs)
    if rs.is_main:
        if meta is None:  # a fresh run in an old folder starts fresh logs
            for path in logs:
                if os.path.exists(path):
                    os.remove(path)
        else:
            evaluation.truncate_metrics(logs[0], meta["iteration"])
            episodes.truncate(logs[1], meta["iteration"])
            log.info("resuming %s at iteration %d", c.run_dir, meta["iteration"])
        _write_config(c, rs.model_config, os.path.join(c.run_dir, "config.json"))
    if meta is None and c.init_from:
        meta = start_from(rs, c.init_from, logs)
        save(rs, 0, meta)
    writer = MetricsWriter(c.run_dir, enabled=rs.is_main)

    def evaluate_all(tag: str, it: int) -> dict:
        out = {split: evaluate(rs, split, tag, it) for split in c.final_splits}
        for split, summary in out.items():
            writer.write(it, evaluation.prefixed(summary, f"eval/{split}/"))
        return out

    if meta is None:
        with rs.timer("warm_start"):
            warm_start(rs)
        meta = {"before": evaluate_all("before LOOP", 0), "iteration": 0}
        save(rs, 0, meta)
    for it in range(meta["iteration"], c.iterations):
        metrics = iteration(rs, it)
        if c.eval_every and (it + 1) % c.eval_every == 0 and it + 1 < c.iterations:
            metrics.update(evaluation.prefixed(evaluate(rs, c.eval_split, "during", it + 1),
                                               f"eval/{c.eval_split}/"))
        metrics.update(rs.timer.shares())
        writer.write(it + 1, metrics)
        log.info("iteration %d: reward %.3f success %.3f kl %.4f clip %.3f (%.1fs collect, "
                 "%.1fs update)",
                 it + 1, metrics["train/reward"], metrics["train/success"],
                 metrics.get("update/kl_k1", 0.0), metrics.get("update/clip_fraction", 0.0),
                 metrics["time/iteration_collect_s"], metrics["time/iteration_update_s"])
        if (it + 1) % c.checkpoint_every == 0 or it + 1 == c.iterations:
            save(rs, it + 1, meta)
    after = evaluate_all("after LOOP", c.iterations)
    writer.close()
    summary = {"before": meta["before"], "after": after, "run_dir": c.run_dir,
               "wall_s": time.perf_counter() - t_start,
               "compiles": {"update": rs.update_step.num_compiles(),
                            "sampler": dict(rs.engine.programs.traces)}}
    if rs.is_main:
        evaluation.write_reports(c.run_dir, summary, rs.shown, TRAJECTORIES_HTML)
    for env in rs.envs:
        env.close()
    rs.ckpt.close()
    return summary

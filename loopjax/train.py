"""The outer LOOP loop: collect G x K rollouts, leave-one-out advantages, PPO epochs, evaluate, save.

    summary = train.run(config)      # what `python -m experiments.appworld_loop` calls

One iteration (ALGORITHM.md): sample G training tasks -> K rollouts each with the current policy
(the sampler runs on the learner's own params) -> rewards -> A_k = R_k - mean_{i != k} R_i ->
drop |A| < 0.01 -> `epochs_per_iteration` epochs of clipped-surrogate minibatch steps. The run
starts with a warm start (SFT on ground-truth demonstrations) when the policy cannot act yet and
evaluates held-out splits before LOOP and after it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from loopjax import eval as evaluation, multihost
from loopjax.checkpoint import Checkpointer, abstract_like, set_aside
from loopjax.config import TrainConfig
from loopjax.envs import ground_truth, list_tasks, make_env
from loopjax.loop import advantages, keep_mask, split_params
from loopjax.loop.epochs import run_iteration
from loopjax.loop.update import init_train_state, make_optimizer, make_update_step
from loopjax.metrics import MetricsWriter, Timer, progress
from loopjax.policy import build_policy
from loopjax.rollout.collector import EpisodeLimits, collect
from loopjax.sampling import engine as sampling_engine
from loopjax.sampling.engine import SamplingEngine
from loopjax.sharding import batch_sharding, initialize_distributed, make_mesh
from loopjax import warmstart

log = logging.getLogger("loopjax")

MAX_SLOTS = 64  # concurrent episodes (sampler slots, sandbox workers)


class Trainer:
    """Holds the run's long-lived pieces: policy state, sampler, environments, writers."""

    def __init__(self, config: TrainConfig):
        self.config = c = config.check()
        self.dist = initialize_distributed(c.multihost)
        self.is_main = jax.process_index() == 0
        os.makedirs(c.run_dir, exist_ok=True)
        self.mesh = make_mesh(c.mesh)
        self.sampler_mesh = multihost.local_mesh(self.mesh)  # this host's devices (all on one host)
        self.key = jax.random.key(c.seed)
        self.timer = Timer()
        self.gt = lambda task_id: ground_truth(task_id, c.env)
        self.demo = warmstart.scripted_agents(c.env, c.demo_careful, c.seed)
        self._needs_paging: dict[str, bool] = {}
        self.train_tasks = list_tasks(c.env, c.train_split)
        if not self.train_tasks:
            raise ValueError(f"world {c.env!r} has no training tasks")
        # Other processes build their (identical) tokenizer in a folder of their own: hosts may
        # share the run folder, and process 0's files are not visible on every host.
        policy_c = c if self.is_main else dataclasses.replace(
            c, run_dir=os.path.join(c.run_dir, f"process{jax.process_index()}"))
        os.makedirs(policy_c.run_dir, exist_ok=True)
        self.tokenizer, self.model_config, params = build_policy(policy_c, self.demo,
                                                                 self.train_tasks)
        multihost.check_same("the tokenizer or model config",
                             multihost.fingerprint(self.tokenizer, self.model_config))
        self.state = init_train_state(self.model_config, c.update, params,
                                      jax.random.fold_in(self.key, 1), self.mesh)
        self.update_step = make_update_step(self.model_config, c.update, self.mesh, self.state)
        # Each host samples its share of the tasks on its own devices (loopjax.multihost).
        per_host = -(-c.tasks_per_iteration // jax.process_count()) * c.rollouts_per_task
        n_slots = min(MAX_SLOTS, max(per_host, 1))
        self.engine = SamplingEngine(self.model_config, n_slots, c.max_seq_len,
                                     mesh=self.sampler_mesh,
                                     stop_ids=sorted(self.tokenizer.eos_ids),
                                     decode_steps=32, min_len_bucket=64)
        self.envs = [make_env(c.env) for _ in range(n_slots)]
        self.limits_train = EpisodeLimits(c.max_interactions_train, c.max_new_tokens, c.max_seq_len,
                                          c.max_obs_tokens, c.compact_prompt)
        self.limits_eval = EpisodeLimits(c.max_interactions_eval, c.max_new_tokens, c.max_seq_len,
                                         c.max_obs_tokens, c.compact_prompt)
        ckpt_dir = os.path.join(c.run_dir, "checkpoints")
        if not c.resume:
            if self.is_main:
                set_aside(ckpt_dir)
            multihost.barrier("checkpoints set aside")
        self.ckpt = Checkpointer(ckpt_dir, keep=c.keep_checkpoints)
        self.episodes_for_html: list[dict] = []

    # ------------------------------------------------------------------------- policy access

    @property
    def params_lora(self):
        return split_params(self.state.trainable, self.state.base)

    def rollouts(self, task_ids, groups, *, limits, key, temperature, desc, straggler=True):
        """Episodes of (task, group) pairs; every process gets all records, in request order."""
        c = self.config
        mine = multihost.my_episodes(groups)  # all of them on one host
        params, lora = multihost.local_view(self.params_lora, self.sampler_mesh)
        bar = progress(len(mine), desc, enabled=self.is_main)
        with bar:
            records, stats = collect(
                self.engine, params, lora, self.envs, self.tokenizer, [task_ids[i] for i in mine],
                [groups[i] for i in mine], limits, indices=mine,
                key=key, temperature=temperature, workers=c.env_workers, overlap=c.overlap_env,
                straggler_fraction=c.straggler_fraction if straggler else 1.0,
                straggler_task_fraction=c.straggler_task_fraction if straggler else 1.0,
                progress=bar.update)
        records, stats = multihost.gather_rollouts(records, stats)
        for r in records:
            r["needs_paging"] = self.needs_paging(r["task_id"])
        return records, stats

    def needs_paging(self, task_id: str) -> bool:
        """Whether the task's ground truth walks the pages of a list (False without one)."""
        if task_id not in self._needs_paging:
            try:
                gt = "\n".join(self.gt(task_id))
            except NotImplementedError:
                gt = ""
            self._needs_paging[task_id] = "page_index" in gt
        return self._needs_paging[task_id]

    def evaluate(self, split: str, tag: str, iteration: int) -> dict:
        c = self.config
        tasks = list_tasks(c.env, split)
        if c.max_eval_tasks:
            tasks = tasks[:c.max_eval_tasks]
        key = jax.random.fold_in(jax.random.fold_in(self.key, 7), evaluation.split_index(split))
        with self.timer("eval"):
            records, _ = self.rollouts(tasks, list(range(len(tasks))), limits=self.limits_eval,
                                       key=key, temperature=c.eval_temperature,
                                       desc=f"eval {split} ({tag})", straggler=False)
        for r in records:
            r.update(split=split, tag=tag, iteration=iteration)
        shown = max(1, c.num_trajectories_html // 6)  # evenly spaced: one of several templates
        self.episodes_for_html += records[::max(1, len(records) // shown)][:shown]
        return evaluation.summarize(records)

    # ------------------------------------------------------------------------- phases

    def warm_start(self):
        c = self.config
        if c.warm_start == "none":
            return
        params, lora = self.params_lora
        if c.warm_start == "sft":
            records = warmstart.demonstrations(self.envs[0], self.tokenizer, self.train_tasks,
                                               self.demo, self.limits_train)
        else:  # rft: the policy's own successes, sampled K times per train task
            records = []
            for r in range(c.rft_rounds):
                recs, _ = self.rollouts(self.train_tasks * c.rollouts_per_task,
                                        list(range(len(self.train_tasks))) * c.rollouts_per_task,
                                        limits=self.limits_train, temperature=c.temperature,
                                        key=jax.random.fold_in(self.key, 100 + r), desc="rft")
                records += [x for x in recs if x["success"]]
            if not records:
                log.warning("rft: no successful rollouts; skipping the warm start")
                return
        log.info("warm start (%s) on %d demonstrations, %d steps", c.warm_start, len(records),
                 c.sft_steps)
        trained, sft_opt_state = warmstart.sft(
            self.model_config, self.state.trainable, self.state.base, records, steps=c.sft_steps,
            rows=c.sft_rows, length=c.max_seq_len, learning_rate=c.sft_learning_rate,
            key=jax.random.fold_in(self.key, 2), batch_sharding=batch_sharding(self.mesh),
            log=lambda i, loss: log.info("sft step %d loss %.4f", i, loss))
        opt_state = make_optimizer(c.update).init(trained)
        if c.sft_moments_to_loop:
            opt_state = warmstart.with_second_moments(opt_state, sft_opt_state)
        # The new optimizer state is made outside jit: place it on the state's shardings (global
        # arrays, which a multi-host checkpoint save needs).
        placed = jax.device_put(self.state.replace(base=None, trainable=trained, opt_state=opt_state),
                                self.update_step.state_shardings)
        self.state = placed.replace(base=self.state.base)

    def iteration(self, it: int) -> dict:
        c = self.config
        G, K = c.tasks_per_iteration, c.rollouts_per_task
        key_it = jax.random.fold_in(jax.random.fold_in(self.key, 3), it)
        # The task sampler's state is (seed, iteration): a resumed run draws the same tasks.
        rng = np.random.default_rng([c.seed, it])
        tasks = [self.train_tasks[i] for i in
                 rng.choice(len(self.train_tasks), size=G, replace=G > len(self.train_tasks))]
        t0 = time.perf_counter()
        with self.timer("collect"):
            records, stats = self.rollouts(
                [t for t in tasks for _ in range(K)], [g for g in range(G) for _ in range(K)],
                limits=self.limits_train, key=jax.random.fold_in(key_it, 0),
                temperature=c.temperature, desc=f"iteration {it} rollouts")
        collect_s = time.perf_counter() - t0
        failed = [r for r in records if r.get("env_failure")]
        if failed:  # the environment broke, not the policy: such rollouts carry no signal
            log.warning("%d rollouts dropped for environment failures, e.g. %s", len(failed),
                        failed[0]["env_failure"])
            records = [r for r in records if not r.get("env_failure")]
        # Leave-one-out within each task, over the rollouts that finished (a task left with one
        # rollout has no baseline: A = 0).
        u = c.update
        adv = np.asarray(advantages(np.array([r["reward"] for r in records], np.float32),
                                    u.baseline, u.normalize_std,
                                    group_ids_N=np.array([r["group"] for r in records], np.int32)))
        t0 = time.perf_counter()
        with self.timer("update"):
            self.state, history = run_iteration(
                self.update_step, self.state, records, adv, jax.random.fold_in(key_it, 1), c.epochs,
                progress=lambda n: progress(n, f"iteration {it} updates", enabled=self.is_main))
        update_s = time.perf_counter() - t0
        rewards = np.array([r["reward"] for r in records])
        metrics = {
            "train/reward": rewards.mean(), "train/success": np.mean([r["success"] for r in records]),
            **evaluation.prefixed(evaluation.behaviour(records), "train/"),
            "train/generated_tokens": np.mean([r["num_generated"] for r in records]),
            "train/episodes_cut": stats["cut"], "train/env_failures": len(failed),
            "adv/mean": adv.mean(), "adv/abs_mean": np.abs(adv).mean(), "adv/std": adv.std(),
            "adv/filtered_share": 1.0 - np.mean(keep_mask(adv, u.adv_min_abs, u.adv_positive_only)),
            "update/steps": len(history),
            "time/iteration_collect_s": collect_s, "time/iteration_update_s": update_s,
            "time/iteration_generate_s": stats["generate_s"],
            "time/iteration_env_wait_s": stats["env_wait_s"],
            "time/tokens_per_s": sum(r["num_generated"] for r in records) / max(stats["generate_s"], 1e-9),
            "compiles/update": self.update_step.num_compiles(),
            "compiles/sampler": sum(sampling_engine.TRACES.values()),
        }
        for k in ("loss", "grad_norm", "clip_fraction", "kl_k1", "kl_k3", "rows", "T"):
            if history:
                metrics[f"update/{k}"] = float(np.mean([h[k] for h in history]))
        if history:
            metrics["update/stopped_on_kl"] = float(history[-1]["stopped_on_kl"])
            metrics["update/nan_skips"] = history[-1]["nan_skips"]
        self.episodes_for_html += [dict(r, split="train", tag="train", iteration=it)
                                   for r in records[:2]]
        return metrics

    # ------------------------------------------------------------------------- the run

    def save(self, iteration: int, meta: dict):
        trained = self.state.replace(base=None)
        self.ckpt.save(iteration, trained, dict(meta, iteration=iteration))

    def restore(self) -> dict | None:
        if not self.config.resume or self.ckpt.latest_step() is None:
            return None
        step, trained, meta = self.ckpt.restore(abstract_like(self.state.replace(base=None)))
        self.state = trained.replace(base=self.state.base)
        return meta


def _write_config(config: TrainConfig, model_config, path: str):
    with open(path, "w") as f:
        json.dump({"train": config.to_dict(), "model": model_config.__dict__}, f, indent=2, default=str)


def run(config: TrainConfig) -> dict:
    """The whole job; returns {"before": {split: summary}, "after": {...}, "run_dir": ...}."""
    c = config
    t_start = time.perf_counter()
    trainer = Trainer(c)
    metrics_path = os.path.join(c.run_dir, "metrics.jsonl")
    meta = trainer.restore()
    if meta is None:
        if trainer.is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run in an old folder starts a fresh log
    else:
        if trainer.is_main:
            evaluation.truncate_metrics(metrics_path, meta["iteration"])
        log.info("resuming %s at iteration %d", c.run_dir, meta["iteration"])
    writer = MetricsWriter(c.run_dir, enabled=trainer.is_main)
    if trainer.is_main:
        _write_config(c, trainer.model_config, os.path.join(c.run_dir, "config.json"))
    if meta is None:
        with trainer.timer("warm_start"):
            trainer.warm_start()
        before = {s: trainer.evaluate(s, "before LOOP", 0) for s in c.final_splits}
        for split, summ in before.items():
            writer.write(0, evaluation.prefixed(summ, f"eval/{split}/"))
        meta = {"before": before, "iteration": 0}
        trainer.save(0, meta)
    for it in range(meta["iteration"], c.iterations):
        metrics = trainer.iteration(it)
        if c.eval_every and (it + 1) % c.eval_every == 0 and it + 1 < c.iterations:
            metrics.update(evaluation.prefixed(trainer.evaluate(c.eval_split, "during", it + 1),
                                               f"eval/{c.eval_split}/"))
        metrics.update(trainer.timer.shares())
        writer.write(it + 1, metrics)
        log.info("iteration %d: reward %.3f success %.3f kl %.4f clip %.3f (%.1fs collect, %.1fs update)",
                 it + 1, metrics["train/reward"], metrics["train/success"],
                 metrics.get("update/kl_k1", 0.0), metrics.get("update/clip_fraction", 0.0),
                 metrics["time/iteration_collect_s"], metrics["time/iteration_update_s"])
        if (it + 1) % c.checkpoint_every == 0 or it + 1 == c.iterations:
            trainer.save(it + 1, dict(meta, iteration=it + 1))
    after = {s: trainer.evaluate(s, "after LOOP", c.iterations) for s in c.final_splits}
    for split, summ in after.items():
        writer.write(c.iterations, evaluation.prefixed(summ, f"eval/{split}/"))
    writer.close()
    summary = {"before": meta["before"], "after": after, "run_dir": c.run_dir,
               "wall_s": time.perf_counter() - t_start,
               "compiles": {"update": trainer.update_step.num_compiles(),
                            "sampler": dict(sampling_engine.TRACES)}}
    if trainer.is_main:
        evaluation.write_reports(c.run_dir, summary, trainer.episodes_for_html, c.num_trajectories_html)
    for env in trainer.envs:
        env.close()
    trainer.ckpt.close()
    return summary

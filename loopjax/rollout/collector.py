"""The environment loop: many episodes at once, their generation batched on the sampler's slots.

Each round, every episode waiting for the policy gets its new tokens (prompt, or the last
environment reply) prefilled and a turn decoded, all in one batched call on the device. Finished
turns go to a thread pool that runs `env.step` (the agent's code runs in sandbox worker
processes, never here); with `overlap=True` the next round starts with the episodes that are
ready while other episodes' code still runs, so the device does not wait for environments.
`overlap=False` waits for all of a round's environment steps: batches then do not depend on
timing, and a run is bit-for-bit reproducible (what resume-equivalence tests use).

Episodes end when the agent calls complete_task, when the interaction budget is spent, or when
the context is full. A collection stops early (straggler cut) once `straggler_fraction` of all
episodes AND `straggler_task_fraction` of each group's episodes are finished.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from loopjax.agent import (
    NO_CODE_MESSAGE,
    Conversation,
    extract_code,
    format_observation,
    react_messages,
)
from loopjax.envs.base import EpisodeRecord, EvalResult, Turn
from loopjax.rollout.batch import Rollout
from loopjax.rollout.records import CollectionSummary


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
    max_interactions: int = 40  # agent turns
    max_new_tokens: int = 1500  # per turn
    max_seq_len: int = 32768  # whole conversation
    max_obs_tokens: int = 3000  # environment output shown to the agent
    compact_prompt: bool = False  # the short prompt without the worked example


@dataclasses.dataclass
class Episode:
    """One rollout in progress; `record()` gives the finished Rollout."""
    index: int  # the episode's global index in the request (its identity for PRNG keys)
    task_id: str
    group: int  # which task of the iteration (episodes of one group share a baseline)
    conv: Conversation | None = None
    instruction: str = ""
    turns: list[Turn] = dataclasses.field(default_factory=list)
    done: bool = False
    end_reason: str = ""
    eval: EvalResult | None = None
    slot: int = -1
    future: cf.Future | None = None
    env_failure: str | None = None  # set when the environment, not the agent, failed

    def record(self) -> Rollout:
        episode = EpisodeRecord(self.task_id, self.instruction, tuple(self.turns),
                                self.end_reason, self.eval, self.env_failure)
        return Rollout(**self.conv.as_arrays(), reward=float(self.eval.reward),
                       success=bool(self.eval.success), task_id=self.task_id, group=self.group,
                       index=self.index, episode=episode)


def collect(engine, params, lora, envs: Sequence, tokenizer, task_ids: Sequence[str],
            groups: Sequence[int], limits: EpisodeLimits, *, key, temperature: float = 1.0,
            workers: int = 8, overlap: bool = True, straggler_fraction: float = 1.0,
            straggler_task_fraction: float = 1.0,
            progress: Callable[[int], None] | None = None,
            indices: Sequence[int] | None = None) -> tuple[list[Rollout], CollectionSummary]:
    """Runs one episode per task id on the engine's slots (one env per slot, reused).

    Episode i samples with PRNG key fold_in(key, indices[i]) (default indices: 0, 1, ...), so its
    draws do not depend on which slot, batch or host it ran in: a host running a share of an
    iteration's episodes passes their global indices. Returns (the finished episodes' Rollouts in
    request order, the collection's CollectionSummary).
    """
    import jax  # noqa: PLC0415

    indices = range(len(task_ids)) if indices is None else indices
    episodes = [Episode(i, t, g) for i, t, g in zip(indices, task_ids, groups, strict=False)]
    queue = list(reversed(episodes))
    num_slots = min(engine.num_slots, len(envs))
    free_slots = list(reversed(range(num_slots)))
    group_total = np.bincount(np.asarray(groups, int)) if len(groups) else np.zeros(0, int)
    group_done = np.zeros_like(group_total)
    by_slot: dict[int, Episode] = {}
    consumed: dict[int, int] = {}  # slot -> conversation tokens already handed to the engine
    finished: list[Episode] = []
    generate_s, env_wait_s, device_steps = 0.0, 0.0, 0
    engine.reset_prefix_cache()  # cached prompt pages hold keys and values of earlier params
    engine.peak_pages = 0
    prefilled = engine.prefill_tokens, engine.prefill_shared_tokens
    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers))

    def start(ep: Episode, slot: int):
        ep.slot, by_slot[slot], consumed[slot] = slot, ep, 0
        ep.future = pool.submit(start_episode, envs[slot], ep, tokenizer, limits)

    def finish(ep: Episode, reason: str):
        ep.done, ep.end_reason = True, reason
        engine.free(ep.slot)
        ep.future = pool.submit(_evaluate, envs[ep.slot], ep)

    def ask_policy(ep: Episode):
        # Room for the turn plus what closes it (end-of-turn, the template's newline).
        room = limits.max_seq_len - len(ep.conv.tokens) - 3
        if room < 1:
            return finish(ep, "context_full")
        new = ep.conv.tokens[consumed[ep.slot]:]
        first = consumed[ep.slot] == 0
        engine.add(ep.slot, new, key=jax.random.fold_in(key, ep.index) if first else None,
                   max_new_tokens=min(limits.max_new_tokens, room), temperature=temperature)
        consumed[ep.slot] = len(ep.conv.tokens)

    def harvest(ep: Episode):
        result, ep.future = ep.future.result(), None
        if ep.done:  # evaluation is back: record it, and the slot takes the next task
            ep.eval = result
            finished.append(ep)
            group_done[ep.group] += 1
            del by_slot[ep.slot]
            if progress:
                progress(1)
            if queue:
                start(queue.pop(), ep.slot)
        elif result is not None:  # the episode ended (complete_task, budget, context)
            finish(ep, result)
        else:
            ask_policy(ep)

    def cut_stragglers() -> bool:
        n = len(finished)
        if straggler_fraction >= 1.0 or n < straggler_fraction * len(episodes):
            return False
        return bool(np.all(group_done >= np.ceil(straggler_task_fraction * group_total)))

    try:
        while queue and free_slots:
            start(queue.pop(), free_slots.pop())
        while by_slot and not cut_stragglers():
            pending = [ep.future for ep in by_slot.values() if ep.future is not None]
            t0 = time.perf_counter()
            if pending and (not overlap or not engine.busy()):
                cf.wait(pending,
                        return_when=cf.ALL_COMPLETED if not overlap else cf.FIRST_COMPLETED)
            env_wait_s += time.perf_counter() - t0
            for ep in sorted(by_slot.values(), key=lambda e: e.index):
                if ep.future is not None and ep.future.done():
                    harvest(ep)
            if not engine.busy():
                continue
            t0 = time.perf_counter()
            gens = engine.step(params, lora) if overlap else engine.generate(params, lora)
            generate_s += time.perf_counter() - t0
            device_steps += 1
            for g in gens:
                ep = by_slot[g.slot]
                # The engine holds the sampled ids itself (the last one is fed with the next
                # request), so the next request starts after them.
                consumed[g.slot] += len(g.ids)
                ep.conv.add_generated([int(i) for i in g.ids], [float(x) for x in g.logps])
                if g.stop_reason == "context_full":
                    ep.turns.append(Turn(ep.conv.text_of_turn(-1), "", "(context full)"))
                    finish(ep, "context_full")
                else:
                    ep.future = pool.submit(step_episode, envs[g.slot], ep, tokenizer, limits)
    finally:
        for ep in by_slot.values():  # stragglers: dropped, their slots released
            if ep.future is not None:
                ep.future.cancel()
            engine.free(ep.slot)
        pool.shutdown(wait=True, cancel_futures=True)
    finished.sort(key=lambda e: e.index)
    summary = CollectionSummary(
        generate_s=generate_s, env_wait_s=env_wait_s, device_steps=device_steps,
        cut=len(episodes) - len(finished),
        prefill_tokens=engine.prefill_tokens - prefilled[0],
        prefill_shared_tokens=engine.prefill_shared_tokens - prefilled[1],
        kv_peak_bytes=engine.pages_bytes(engine.peak_pages))
    return [ep.record() for ep in finished], summary


def _evaluate(env, ep: Episode):
    """The final unit tests; an environment that failed (e.g. a crashed AppWorld server that could
    not be recovered) marks the episode, so the trainer leaves it out of the update."""
    result = env.evaluate()
    ep.env_failure = getattr(env, "failure", None)
    return result


def start_episode(env, ep: Episode, tokenizer, limits: EpisodeLimits):
    """Starts an episode: the prompt goes into a fresh conversation. Returns None (ready)."""
    obs = env.reset(ep.task_id)
    ep.instruction = obs.instruction
    ep.conv = Conversation(tokenizer)
    sup = obs.supervisor
    for role, text in react_messages(obs.instruction, name=sup.name, email=sup.email,
                                     phone=sup.phone_number, date=obs.date,
                                     compact=limits.compact_prompt):
        ep.conv.add_message(role, text)
    ep.conv.start_assistant()
    if len(ep.conv.tokens) + 1 >= limits.max_seq_len:
        raise ValueError(f"the prompt of task {ep.task_id} has {len(ep.conv.tokens)} tokens, which "
                         f"leaves no room to generate within max_seq_len={limits.max_seq_len}")
    return None


def step_episode(env, ep: Episode, tokenizer, limits: EpisodeLimits, run: str | None = None):
    """Runs the turn's code (or `run`, a scripted demonstration's equivalent of it); appends the
    environment's reply. Returns an end reason or None."""
    text = ep.conv.text_of_turn(-1)
    code = extract_code(text)
    if code:
        res = env.step(code if run is None else run)
        output, done = res.output, res.done
    else:
        output, done = NO_CODE_MESSAGE, False
    ep.turns.append(Turn(text, code, output))
    if done:
        return "complete_task"
    if len(ep.turns) >= limits.max_interactions:
        return "max_interactions"
    reply = format_observation(output, instruction=ep.instruction, tokenizer=tokenizer,
                               max_tokens=limits.max_obs_tokens, compact=limits.compact_prompt)
    # The reply and the next assistant header must leave room for at least one generated token;
    # otherwise the episode ends here and the rollout never exceeds the context.
    added = len(tokenizer.message_ids("user", reply)) + len(tokenizer.generation_prompt_ids())
    if len(ep.conv.tokens) + added + 1 >= limits.max_seq_len:
        return "context_full"
    ep.conv.add_message("user", reply)
    ep.conv.start_assistant()
    return None

"""Warm start for policies that cannot act yet: supervised fine-tuning on demonstrations.

SFT-GT (the paper's baseline): the world's scripted ground-truth solutions, replayed through the
same environment loop code and recorded as token-level conversations, train the policy with
cross-entropy on the assistant tokens only. RFT: the same step on the policy's own successful
rollouts (the trainer collects them).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from loopjax.agent import format_code_turn, format_observation, react_messages
from loopjax.envs import demonstration
from loopjax.loop.update import rollout_logprobs
from loopjax.rollout import (
    Batch,
    Episode,
    EpisodeLimits,
    Rollout,
    pack_demonstrations,
    start_episode,
    step_episode,
)

log = logging.getLogger(__name__)


def scripted_agents(world: str, careful: float, seed: int) -> Callable[[str], tuple[list, bool]]:
    """The warm start's demonstrators: `demo(task_id) -> ([(code written, code run)], careful)`
    where careful = the agent has every habit (its episode must solve the task).

    careful = 1.0: the ground truth (SFT-GT). Below 1, each task's demonstration comes from an
    agent whose two habits (read the API docs first; walk every page of a list) are each present
    with probability `careful`, drawn per task from `seed`: an imperfect base policy, the way a
    pretrained model is imperfect, which LOOP can improve on (README, "miniworld-tiny")."""
    if not 0.0 <= careful <= 1.0:
        raise ValueError(f"demo_careful must be in [0, 1], got {careful}")

    def demo(task_id: str) -> tuple[list[tuple[str, str]], bool]:
        # careful = 1.0 draws both habits every time: the ground truth (envs.demonstration)
        lookup, paging = (np.random.default_rng([seed, zlib.crc32(task_id.encode())]).random(2)
                          < careful)
        turns = demonstration(task_id, world, lookup=bool(lookup), paging=bool(paging))
        return turns, bool(lookup and paging)
    return demo


def transcripts(env, task_ids, demo, *, compact: bool) -> list[str]:
    """Text of demonstrated episodes (prompt, code turns, replies): a tokenizer corpus."""
    texts = []
    for task_id in task_ids:
        obs = env.reset(task_id)
        sup = obs.supervisor
        for _, text in react_messages(obs.instruction, name=sup.name, email=sup.email,
                                      phone=sup.phone_number, date=obs.date, compact=compact):
            texts.append(text)
        for written, code in demo(task_id)[0]:
            texts.append(format_code_turn(written))
            res = env.step(code)
            texts.append(format_observation(res.output, instruction=obs.instruction,
                                            compact=compact))
    return texts


def demonstrations(env, tokenizer, task_ids, demo, limits: EpisodeLimits) -> list[Rollout]:
    """Scripted episodes as rollout records (assistant turns marked as outputs, logp 0).

    `demo(task_id)` gives (code written, code run) per turn and whether the agent is careful:
    the conversation holds what the agent wrote, the world runs its equivalent today (outputs
    are the same). A careless agent's episode is kept whether it succeeds or not (that is the
    behaviour being imitated); a careful one that completes the task and fails is a bug in the
    ground truth."""
    records, skipped = [], []
    for i, task_id in enumerate(task_ids):
        ep = Episode(i, task_id, i)
        end = start_episode(env, ep, tokenizer, limits)
        turns, careful = demo(task_id)
        for written, code in turns:
            if end is not None:
                break
            ids = tokenizer.encode(format_code_turn(written)) + [tokenizer.end_of_turn_id]
            if (len(ids) > limits.max_new_tokens
                    or len(ep.conv.tokens) + len(ids) >= limits.max_seq_len):
                end = "context_full"
                break
            ep.conv.add_generated(ids, [0.0] * len(ids))
            end = step_episode(env, ep, tokenizer, limits, run=code)
        ep.end_reason, ep.eval = end or "script_ended", env.evaluate()
        if end == "context_full" or (end is None and not ep.eval.success):
            skipped.append(task_id)  # the episode limits (context, turns) cut the solution off
        elif ep.eval.success or not careful:
            records.append(ep.record())
        else:
            raise RuntimeError(f"ground truth of {task_id} does not solve it: {ep.eval.failures}")
    if skipped:
        log.warning("%d of %d demonstrations do not fit the episode limits (e.g. %s); skipped",
                    len(skipped), len(task_ids), skipped[0])
    return records


def make_sft_step(model_config, optimizer):
    """Jitted step: mean negative log-likelihood of the generated tokens of a packed batch (the
    one packer's Batch with one microbatch)."""

    def loss_fn(trainable, base, batch: Batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        logp_BxT = rollout_logprobs(model_config, trainable, base, mb)
        return -jnp.sum(logp_BxT * mb.mask_UxBxT) / jnp.maximum(jnp.sum(mb.mask_UxBxT), 1.0)

    def step(trainable, opt_state, base, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, base, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def sft_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """The warm start's AdamW: global-norm clip 1.0, learning rate cosine-decayed to 10%."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(optax.cosine_decay_schedule(learning_rate, max(steps, 1), 0.1),
                                   weight_decay=0.0))


def sft(model_config, trainable, base, records, *, steps: int, rows: int, length: int,
        learning_rate: float, key, batch_sharding=None, log=None):
    """`steps` AdamW steps (cosine-decayed learning rate) on `records` packed into rows x length
    batches, walking through shuffled epochs; returns (the trained `trainable`, the optimizer
    state)."""
    if not records:
        raise ValueError("supervised fine-tuning needs at least one demonstration")
    optimizer = sft_optimizer(learning_rate, steps)
    opt_state = optimizer.init(trainable)
    step_fn = make_sft_step(model_config, optimizer)
    # Slots for every demonstration that can share a row: static, so one compile.
    slots = rows * max(1, length // min(len(r.tokens) for r in records))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    order: list[int] = []
    for i in range(steps):
        if len(order) < len(records):
            order += list(rng.permutation(len(records)))
        batch, used = pack_demonstrations(records, order, rows, length, slots)
        order = order[used:]
        if batch_sharding is not None:
            batch = jax.device_put(batch, batch_sharding)
        trainable, opt_state, loss = step_fn(trainable, opt_state, base, batch)
        if log is not None and (i % 25 == 0 or i == steps - 1):
            log(i, float(loss))
    return trainable, opt_state


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def with_second_moments(opt_state, sft_opt_state):
    """`opt_state` (a fresh AdamW state) with the warm start's second moments and step count.

    A fresh Adam divides the first gradients by their own magnitude, so its first steps move every
    weight by about the learning rate whatever the gradient's size: on a small model trained in
    full with noisy policy gradients that is a random walk. Starting from the SFT's second moments
    (and its count, so there is no bias correction to undo) scales each weight's step by how large
    its gradients have been. The first moments start at zero: LOOP does not inherit SFT's momentum.
    """
    (src,) = [x for x in jax.tree.leaves(sft_opt_state, is_leaf=_is_adam) if _is_adam(x)]
    return jax.tree.map(
        lambda x: x._replace(count=src.count, nu=src.nu, mu=jax.tree.map(jnp.zeros_like, x.mu))
        if _is_adam(x) else x, opt_state, is_leaf=_is_adam)

"""A token-level chat builder: the training record of one rollout, built turn by turn.

Every message is tokenized once, when it is appended, and ids are only ever appended, so the
sequence the learner sees is exactly the sequence the sampler produced: generated ids are stored
as sampled, never decoded and re-encoded (ids of a turn need not equal encode(decode(ids))).

Per token the builder keeps (python lists, the same length):
  tokens     the ids;
  is_output  True exactly on ids the policy generated, including the generated end-of-turn id;
             chat headers, the rest of the assistant suffix and all other messages are False;
  logp       the behaviour log-prob of a generated id, 0.0 elsewhere;
  turn_id    k + 1 for the ids generated in assistant turn k (turns count from 0), 0 for every
             id the policy did not generate (so `turn_id > 0` equals `is_output`). Ids stay in
             [0, T), which the packer and the turn-level loss require; the loss masks non-outputs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loopjax.models.tokenizer import Tokenizer

NOT_GENERATED = 0  # turn_id of every token the policy did not generate; turn k's outputs get k + 1


class Conversation:
    """Append-only token sequence of a chat, marking the policy's own tokens.

    Typical rollout:
        conv = Conversation(tok)
        for role, text in prompt_messages: conv.add_message(role, text)
        while not done:
            ids_so_far = conv.start_assistant()          # prompt for the sampler
            ids, logps = sample(ids_so_far)              # stops at an eos id or a length limit
            conv.add_generated(ids, logps)
            output = env.step(extract_code(conv.text_of_turn(-1)))
            conv.add_message("user", format_observation(output, ...))

    A demonstration (warm start) is recorded the same way, with its text's ids and zero log-probs:
    `conv.start_assistant(); conv.add_generated(tok.encode(text) + [tok.end_of_turn_id], zeros)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.is_output: list[bool] = []
        self.logp: list[float] = []
        self.turn_id: list[int] = []
        self.num_turns = 0          # assistant turns generated so far
        self.truncated_turns: list[int] = []  # turns that stopped without an end-of-turn id
        self._open = False          # start_assistant was called, add_generated not yet
        self._append(tokenizer.begin_ids())

    def __len__(self) -> int:
        return len(self.tokens)

    def _append(self, ids: Sequence[int], logps: Sequence[float] | None = None,
                turn: int = NOT_GENERATED) -> None:
        out = turn != NOT_GENERATED
        self.tokens.extend(int(i) for i in ids)
        self.is_output.extend([out] * len(ids))
        self.logp.extend([0.0] * len(ids) if logps is None else (float(x) for x in logps))
        self.turn_id.extend([turn] * len(ids))

    def add_message(self, role: str, text: str) -> list[int]:
        """Append a whole message (prefix + content + suffix, tokenized once), not an output.
        An assistant message added here is context (e.g. a worked example), not a policy turn.
        Returns the ids appended."""
        if self._open:
            raise RuntimeError("add_generated must follow start_assistant before another message")
        ids = self.tokenizer.message_ids(role, text)
        self._append(ids)
        return ids

    def start_assistant(self) -> list[int]:
        """Append the assistant generation prompt (not an output); return ALL ids so far, which
        is the prompt the sampler continues."""
        if self._open:
            raise RuntimeError("start_assistant called twice without add_generated")
        self._append(self.tokenizer.generation_prompt_ids())
        self._open = True
        return list(self.tokens)

    def add_generated(self, ids: Sequence[int], logps: Sequence[float]) -> None:
        """Append the sampled `ids` with their behaviour log-probs as outputs of a new turn,
        then close the turn so that the next message is well formed:
        - last id is the chat format's end-of-turn id (ChatML <|im_end|>): append the rest of the
          assistant suffix ("\\n") as non-output;
        - last id is another eos id (e.g. <|endoftext|>): append the whole assistant suffix
          as non-output;
        - no eos at the end (the length limit stopped it, or `ids` is empty): append the whole
          assistant suffix, end-of-turn id included, as NON-output -- the policy did not choose
          to end the turn, so no log-prob or gradient goes to it; the turn is listed in
          `truncated_turns`.
        The sampler is expected to stop at the first eos id; ids are stored exactly as given.
        """
        if not self._open:
            raise RuntimeError("call start_assistant before add_generated")
        if len(ids) != len(logps):
            raise ValueError(f"{len(ids)} ids but {len(logps)} log-probs")
        turn = self.num_turns
        self._append(ids, logps, turn=turn + 1)
        suffix = self.tokenizer.turn_suffix_ids("assistant")
        last = int(ids[-1]) if len(ids) else None
        if last is not None and last == suffix[0]:
            self._append(suffix[1:])
        else:
            if last not in self.tokenizer.eos_ids:
                self.truncated_turns.append(turn)
            self._append(suffix)
        self.num_turns += 1
        self._open = False

    def generated_ids_of_turn(self, k: int) -> list[int]:
        """The generated ids of assistant turn k (negative k counts from the last turn)."""
        if k < 0:
            k += self.num_turns
        if not 0 <= k < self.num_turns:
            raise IndexError(f"turn {k} of a conversation with {self.num_turns} assistant turns")
        return [t for t, j in zip(self.tokens, self.turn_id, strict=True) if j == k + 1]

    def text_of_turn(self, k: int) -> str:
        """Decoded text of assistant turn k's generated ids, without a final eos id."""
        ids = self.generated_ids_of_turn(k)
        if ids and ids[-1] in self.tokenizer.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """tokens int32, is_output bool, logp float32, turn_id int32 -- all of shape [T]."""
        return {"tokens": np.asarray(self.tokens, np.int32),
                "is_output": np.asarray(self.is_output, bool),
                "logp": np.asarray(self.logp, np.float32),
                "turn_id": np.asarray(self.turn_id, np.int32)}

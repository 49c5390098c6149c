"""The agent side of an episode: ReAct prompt, code extraction, observation truncation, and the
token-level conversation that records a rollout."""
from loopjax.agent.code import NO_CODE_MESSAGE, code_blocks, extract_code
from loopjax.agent.conversation import Conversation
from loopjax.agent.observation import TRUNCATION_MARK, truncate_observation
from loopjax.agent.prompt import format_code_turn, format_observation, react_messages, task_message

__all__ = ["Conversation", "NO_CODE_MESSAGE", "TRUNCATION_MARK", "code_blocks", "extract_code",
           "format_code_turn", "format_observation", "react_messages", "task_message",
           "truncate_observation"]

"""What a chat model is trained on: a conversation's token ids through the model's chat
template, and a loss mask that is True on assistant tokens only.

Each trained assistant message i is located by rendering prefixes of the conversation:

    full    = render(messages)                                   <- the training sequence
    start_i = render(messages[:i], add_generation_prompt=True)   <- ... <|im_start|>assistant\\n
    end_i   = render(messages[:i+1])                             <- ... content<|im_end|>\\n

    tokens   | system+user turns | assistant header | content <|im_end|> \\n | next user ...
    mask     |       False       |      False       |         True          |  False
             0             len(start_i)                             len(end_i)

Most templates (SmolLM2's ChatML among them) render prefix-stably, so start_i and end_i
are exact prefixes of full. Where a template is not (one that rewrites earlier turns,
or a tokenization that merges across a boundary), each boundary falls back to the longest
common prefix with `full`, which trains on no more than the assistant's own tokens.
The mask marks the *targets*: token t is trained when mask[t] is True (predicted from t-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine import common_prefix_length


@dataclass(frozen=True)
class TokenizedExample:
    ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]  # True where the token is a training target

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.loss_mask)

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask[1:])  # the first token has nothing before it to predict it from


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    """Token ids of messages through the chat template (as chat requests are tokenized when served)."""
    if not messages:
        return []
    template_messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    ids = tokenizer.apply_chat_template(template_messages, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def tokenize_chat(messages: list[dict[str, Any]], tokenizer: Any) -> TokenizedExample:
    """(ids, loss mask) of a conversation: loss on every assistant message whose weight is not 0.
    ValueError when the template rejects the conversation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; use prompt/completion examples")
    try:
        full = render(tokenizer, messages, generation_prompt=False)
        mask = [False] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            start = common_prefix_length(render(tokenizer, messages[:i], generation_prompt=True), full)
            end = common_prefix_length(render(tokenizer, messages[: i + 1], generation_prompt=False), full)
            for t in range(start, end):
                mask[t] = True
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"the model's chat template rejected the conversation: {exc}") from exc
    return TokenizedExample(tuple(full), tuple(mask))

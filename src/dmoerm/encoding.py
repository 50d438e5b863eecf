"""Rendering (conversation, response) with the backbone's chat template, truncation, and collation.

The prompt (conversation + the assistant header) and the response suffix are tokenized separately and
concatenated, so the prompt's tokens are an exact prefix of every response's sequence: the router and the
prompt part of the trunk then read the same states for every response to one prompt (causal attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dmoerm.data import Message, PreferenceRecord


@dataclass(frozen=True)
class EncodedInput:
    """One tokenized (conversation, response)."""

    input_ids: tuple[int, ...]
    """Prompt tokens then response tokens (the response's end marker last)."""
    prompt_length: int
    """How many of ``input_ids`` belong to the (possibly left-truncated) prompt."""


def message_dicts(conversation: Sequence[Message | dict]) -> list[dict]:
    out = []
    for m in conversation:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def render(tokenizer, conversation: Sequence[Message | dict], response: str) -> tuple[str, str]:
    """(prompt text, response suffix text) from the chat template; their concatenation is the full chat."""
    messages = message_dicts(conversation)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):
        # Some templates rewrite earlier turns when an assistant turn follows (e.g. strip reasoning);
        # fall back to appending the response and the end-of-turn token.
        return prompt, response + (tokenizer.eos_token or "")
    return prompt, full[len(prompt) :]


def prompt_window(prompt_length: int, max_length: int) -> int:
    """Prompt tokens kept (its end): all of it up to ``max_length // 2``, whatever the response.

    The window depends on the prompt and the limit only, never on the response, so every response to one
    prompt carries the same prompt tokens: the router reads the same states for each of them and the
    responses to one prompt always share a route (issue 13; a window that gave the response's leftover
    budget to the prompt sent chosen and rejected of 9 in 216 test pairs to different inner models).
    """
    return min(prompt_length, max_length // 2)


def encode(tokenizer, conversation: Sequence[Message | dict], response: str, max_length: int) -> EncodedInput:
    """Tokenize and truncate to ``max_length`` tokens.

    The conversation keeps its last :func:`prompt_window` tokens (left truncation, independent of the
    response); the response keeps its end (where the reward is read) within the rest of the budget.
    """
    prompt_text, suffix_text = render(tokenizer, conversation, response)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix_text, add_special_tokens=False)["input_ids"]
    return cut(prompt_ids, suffix_ids, max_length)


def cut(prompt_ids: Sequence[int], suffix_ids: Sequence[int], max_length: int) -> EncodedInput:
    """The truncation of :func:`encode` on token ids (also used by the exported Hugging Face model): the
    prompt's last :func:`prompt_window` tokens, then the response's end within the rest of the limit."""
    keep = prompt_window(len(prompt_ids), max_length)
    prompt = tuple(prompt_ids[len(prompt_ids) - keep :])
    return EncodedInput(prompt + tuple(suffix_ids[-(max_length - keep) :]), len(prompt))


def encode_prompt(tokenizer, conversation: Sequence[Message | dict], max_length: int) -> EncodedInput:
    """The prompt part alone, exactly as :func:`encode` cuts it for any response (router features)."""
    e = encode(tokenizer, conversation, "", max_length)
    return EncodedInput(e.input_ids[: e.prompt_length], e.prompt_length)


def assistant_header(tokenizer) -> str:
    """The text the chat template puts before an assistant turn (``<|im_start|>assistant\n`` for ChatML)."""
    from dmoerm.data import Message

    with_header, _ = render(tokenizer, [Message("user", "x")], "y")
    without = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    return with_header[len(without) :] if with_header.startswith(without) else ""


def encode_rendered(tokenizer, texts: Sequence[str], max_length: int) -> list[EncodedInput]:
    """Already rendered prompt+response strings (OpenRLHF's API, verl's ``/classify``): each is split at its
    last assistant header, and its prompt keeps its :func:`prompt_window`, so a chat encodes as
    :func:`encode` encodes it. A text over ``max_length`` tokens is refused (:class:`InputTooLongError`),
    never cut: its start would be lost silently."""
    from dmoerm.outputs import InputTooLongError

    header = assistant_header(tokenizer)
    out = []
    for i, text in enumerate(texts):
        split = text.rfind(header) + len(header) if header and header in text else 0
        prompt_ids = tokenizer(text[:split], add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(text[split:], add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(response_ids) > max_length:
            raise InputTooLongError(
                f"query[{i}]: {len(prompt_ids) + len(response_ids)} tokens, over the limit of {max_length}"
            )
        out.append(cut(prompt_ids, response_ids, max_length))
    return out


def collate(batch: Sequence[EncodedInput], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Returns input_ids [B, T] (pad_token_id at pads), attention_mask [B, T] (1 real, 0 pad) and
    prompt_mask [B, T] (1 on prompt tokens).
    """
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        prompt_mask[i, : e.prompt_length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), so batches carry little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class RankedItem:
    """Responses to one prompt (already encoded) with the untied (better, worse) pairs to learn or check."""

    inputs: tuple[EncodedInput, ...]
    pairs: tuple[tuple[int, int], ...]
    weight: float = 1.0
    """Weight of the item's loss (e.g. a judge label's confidence)."""
    category: str | None = None


def encode_record(tokenizer, record: PreferenceRecord, max_length: int) -> RankedItem:
    """Every response of a record, encoded, with the record's untied pairs."""
    inputs = tuple(encode(tokenizer, record.conversation, r, max_length) for r in record.responses)
    return RankedItem(inputs, tuple(record.pairs()), 1.0, record.category)

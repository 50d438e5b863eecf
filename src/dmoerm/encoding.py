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


def encode(tokenizer, conversation: Sequence[Message | dict], response: str, max_length: int) -> EncodedInput:
    """Tokenize and truncate to ``max_length`` tokens.

    The conversation is truncated from the left so the response's end (where the reward is read) stays
    visible. The response keeps at most ``max_length - min(prompt, max_length // 4)`` tokens (its end), so
    some prompt is always seen.
    """
    prompt_text, suffix_text = render(tokenizer, conversation, response)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix_text, add_special_tokens=False)["input_ids"]
    response_budget = max_length - min(len(prompt_ids), max_length // 4)
    suffix_ids = suffix_ids[-response_budget:]
    prompt_budget = max_length - len(suffix_ids)
    prompt_ids = prompt_ids[-prompt_budget:] if prompt_budget > 0 else []
    return EncodedInput(tuple(prompt_ids) + tuple(suffix_ids), len(prompt_ids))


def encode_text(tokenizer, text: str, max_length: int) -> EncodedInput:
    """An already rendered prompt+response string (OpenRLHF's API), left-truncated; prompt unknown (0)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]
    return EncodedInput(tuple(ids), 0)


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

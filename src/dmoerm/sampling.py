"""Responses sampled from a generator for held-back prompts, cached on disk (best-of-n experiments).

Best-of-n needs many samples per prompt, and sampling is the slowest part of the experiment on a CPU, so every
sample is stored in a SQLite file as soon as its batch is done (the judge cache's store, keyed by the generator,
its sampling settings, the conversation and the sample's index): a killed run loses at most one batch, and a
rerun, or a second experiment on the same prompts, samples nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dmoerm.data import Message
from dmoerm.encoding import message_dicts
from dmoerm.labelling.cache import JudgeCache, request_key

logger = logging.getLogger(__name__)


def generate_samples(
    conversations: Sequence[Sequence[Message | dict]],
    n: int,
    cache_path: str | Path,
    *,
    generator: str = "default",
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """``n`` sampled responses to each conversation (pure sampling at ``temperature``: no top-k, no top-p).

    Returns ``[len(conversations)][n]`` response texts (special tokens removed, whitespace stripped). Samples
    already in ``cache_path`` are read back; the missing ones are generated ``batch_size`` at a time and stored
    batch by batch. The generator is loaded only when something is missing.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0 (sampling), got {temperature}")
    from dmoerm.backbone import resolve_backbone

    path = resolve_backbone(generator)
    identity = json.dumps(
        {"generator": generator, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed},
        sort_keys=True,
    )
    store = JudgeCache(cache_path)
    model = tokenizer = None
    out: list[list[str]] = []
    try:
        bar = tqdm(conversations, desc="sampling", unit="prompt", disable=not progress)
        for conversation in bar:
            messages = message_dicts(conversation)
            keys = [request_key(identity, {"conversation": messages, "sample": j}) for j in range(n)]
            have = store.get_many(keys)
            missing = [j for j in range(n) if keys[j] not in have]
            if missing and model is None:
                model, tokenizer = _load_generator(path)
            for start in range(0, len(missing), batch_size):
                todo = missing[start : start + batch_size]
                texts = _sample(
                    model, tokenizer, messages, len(todo), max_new_tokens, temperature, keys[todo[0]]
                )
                rows = [(keys[j], identity, {"text": t}) for j, t in zip(todo, texts)]
                store.put_many(rows)
                have.update({k: p for k, _, p in rows})
            out.append([have[k]["text"] for k in keys])
    finally:
        store.close()
    return out


def _load_generator(path: str):
    from transformers import AutoModelForCausalLM

    from dmoerm.backbone import load_tokenizer

    logger.info("loading generator %s", path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def _sample(
    model, tokenizer, messages: list[dict], k: int, max_new_tokens: int, temperature: float, key: str
):
    """``k`` samples for one prompt, seeded by ``key`` (the first missing sample's cache key): reproducible."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, T]
    torch.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big"))
    generated = model.generate(
        ids.expand(k, -1),  # [k, T]: one prompt, no padding
        attention_mask=torch.ones(k, ids.shape[1], dtype=torch.long),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )  # [k, T + new]
    return [t.strip() for t in tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)]

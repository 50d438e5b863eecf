"""The wire formats RL frameworks speak, for :mod:`dmoerm.serving`: OpenRLHF's ``/get_reward`` and vLLM's
``/classify`` and ``/pooling`` (what verl's reward loop calls).

Shapes were read from the frameworks' own source (quoted where each is built, and in ``docs/serving.md``):

* OpenRLHF (github.com/OpenRLHF/OpenRLHF @ 3c3be62): ``openrlhf/utils/agent.py`` lines 332-336 post
  ``{"query": [...], "prompts": [...], "labels": [...]}``; ``openrlhf/cli/serve_rm.py`` line 133 answers
  ``{"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards}}``; the trainer turns
  every ``extra_logs`` value into a tensor (``openrlhf/trainer/ppo_utils/samples_generator.py`` lines
  293-297: ``info[key] = torch.tensor([value])``; before 6298708, ``experience_maker.py``
  ``update_samples_with_rewards`` concatenated ``extra_logs[key]`` over requests, keys taken from the first
  answer). So every value must be a list of numbers, one per query, under the same keys in every answer.
* vLLM (github.com/vllm-project/vllm): ``vllm/entrypoints/pooling/classify/protocol.py``
  (``ClassificationData``: index, label, probs, num_classes; ``ClassificationResponse``: id ``classify-...``,
  object ``list``, created, model, data, usage), ``vllm/entrypoints/pooling/base/protocol.py`` (request:
  ``model``, ``input`` str | list[str] | token ids, or ``messages``; ``use_activation`` / deprecated
  ``activation`` / ``softmax``), ``.../pooling/protocol.py`` (``PoolingResponseData``: index, object
  ``pooling``, data).
* verl (github.com/volcengine/verl @ b178a3c): ``verl/experimental/reward_loop/reward_loop.py`` lines
  206-213 post ``{"model": ..., "input": <one rendered chat string>, "activation": False}`` to
  ``/classify`` and read ``output["data"][-1]["probs"][-1]``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from dmoerm.outputs import RewardOutput

__all__ = ["breakdown_keys", "extra_logs", "score_texts_outputs"]


# ----------------------------------------------------------------------------------------------------------
# Rendered texts -> RewardOutput (category, probability, capability scores), for /get_reward and /classify


def score_texts_outputs(scorer: Any, texts: list[str], batch_size: int) -> list[RewardOutput]:
    """Score rendered prompt+response strings with the breakdown where the scorer has one
    (``score_texts_outputs``, e.g. :meth:`dmoerm.model.DMoERM.score_texts_outputs`); any other scorer gives
    rewards only (``score_texts``)."""
    own = getattr(scorer, "score_texts_outputs", None)
    if callable(own):
        return list(own(texts, batch_size=batch_size))
    return [RewardOutput(reward=float(r)) for r in scorer.score_texts(texts, batch_size=batch_size)]


# ----------------------------------------------------------------------------------------------------------
# OpenRLHF extra_logs


def breakdown_keys(scorer: Any) -> list[str] | None:
    """The fixed ``extra_logs`` keys of a scorer with a known structure (a DMoERM), else None.

    ``category/<c>`` (1.0 for the category whose inner model scored the item, else 0.0), ``category_index``,
    ``category_probability`` and ``capability/<c>/<k>`` for every capability point ``k`` of every category
    ``c`` (plus ``rm``, the phase-1 model a category without experts falls back to).
    """
    categories = getattr(scorer, "categories", None)
    taxonomy = getattr(scorer, "taxonomy", None)
    if not isinstance(categories, list) or not categories or taxonomy is None:
        return None
    capabilities = {c.name: [k.name for k in c.capabilities] for c in taxonomy.categories}
    keys = ["category_index", "category_probability"] + [f"category/{c}" for c in categories]
    for c in categories:
        keys += [f"capability/{c}/{k}" for k in [*capabilities.get(c, []), "rm"]]
    return keys


def _number(x: Any) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


def extra_logs(
    outputs: Sequence[RewardOutput], keys: list[str] | None, categories: list[str] | None
) -> dict[str, list[float]]:
    """OpenRLHF ``extra_logs``: key -> one number per item (OpenRLHF makes a tensor of each value).

    Absent entries are 0.0, so the batch mean of ``capability/<c>/<k>`` divided by the mean of
    ``category/<c>`` is the mean score of capability ``k`` over the items routed to ``c``. Without known
    ``keys`` (a scorer other than DMoERM) they are taken from the outputs; a single reward model has none.
    """
    if keys is None:
        seen = {o.category for o in outputs if o.category is not None}
        if not seen and not any(o.capability_scores for o in outputs):
            return {}
        categories = categories or sorted(seen)
        keys = ["category_index", "category_probability"] + [f"category/{c}" for c in categories]
        keys += sorted({f"capability/{o.category}/{k}" for o in outputs for k in o.capability_scores})
    index = {c: i for i, c in enumerate(categories or [])}
    logs: dict[str, list[float]] = {k: [0.0] * len(outputs) for k in keys}
    for j, o in enumerate(outputs):
        row = {
            "category_index": float(index.get(o.category, -1)),
            "category_probability": _number(o.category_probability or 0.0),
            f"category/{o.category}": 1.0,
        }
        row.update({f"capability/{o.category}/{k}": _number(v) for k, v in o.capability_scores.items()})
        for k, v in row.items():
            if k in logs:
                logs[k][j] = v
    return logs


# ----------------------------------------------------------------------------------------------------------
# vLLM /classify and /pooling


def use_activation(payload: dict) -> bool:
    """vLLM's ``get_use_activation`` (vllm/config/pooler.py): the first of ``softmax``, ``activation``,
    ``use_activation`` that is set; unset means True (the model's activation: a sigmoid for one label)."""
    for name in ("softmax", "activation", "use_activation"):
        value = payload.get(name)
        if value is not None:
            return bool(value)
    return True


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _usage(prompt_tokens: int) -> dict[str, Any]:
    # vllm/entrypoints/openai/engine/protocol.py UsageInfo
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def classification_response(model: str, values: Sequence[float | None], prompt_tokens: int) -> dict:
    """vLLM's ClassificationResponse for a one-label model: ``probs = [reward]``, label ``LABEL_0`` (the
    transformers default ``id2label`` of ``num_labels=1``; vLLM reports ``id2label[argmax(probs)]``)."""
    return {
        "id": f"classify-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [
            {"index": i, "label": "LABEL_0", "probs": [v], "num_classes": 1} for i, v in enumerate(values)
        ],
        "usage": _usage(prompt_tokens),
    }


def pooling_response(model: str, values: Sequence[float | None], prompt_tokens: int) -> dict:
    """vLLM's PoolingResponse: one ``{"index", "object": "pooling", "data": [reward]}`` per input."""
    return {
        "id": f"pool-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(values)],
        "usage": _usage(prompt_tokens),
    }

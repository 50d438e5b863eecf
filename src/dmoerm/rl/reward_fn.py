"""A TRL-style reward function backed by a Scorer or a reward server.

TRL's ``GRPOTrainer`` (and ``RLOOTrainer``) call each reward function as
``reward_fn(prompts=..., completions=..., completion_ids=..., **dataset_columns_and_trainer_extras)`` and
expect one float per completion. Prompts and completions are either plain strings or, for conversational
datasets, lists of ``{"role", "content"}`` message dicts (a completion is then e.g.
``[{"role": "assistant", "content": "..."}]``). :func:`make_reward_fn` builds such a function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dmoerm.data import Message
from dmoerm.outputs import Scorer
from dmoerm.rl.normalization import RewardNormalization, load_normalization

logger = logging.getLogger(__name__)


def _content_text(content: Any) -> str:
    """Message content as text: a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError(f"content: expected a string or a list of text parts, got {type(content).__name__}")


def _as_message(turn: Any) -> Message:
    if isinstance(turn, Message):
        return turn
    if isinstance(turn, Mapping):
        return Message(role=str(turn.get("role")), content=_content_text(turn.get("content")))
    raise ValueError(f"expected a message dict with role and content, got {type(turn).__name__}")


def to_conversation(prompt: str | Sequence[Any]) -> list[Message]:
    """A TRL prompt as a conversation: a plain string becomes one user turn; message dicts are kept."""
    if isinstance(prompt, str):
        return [Message(role="user", content=prompt)]
    return [_as_message(t) for t in prompt]


def completion_text(completion: str | Sequence[Any]) -> str:
    """A TRL completion as the response text: a string, or the joined content of its message dicts."""
    if isinstance(completion, str):
        return completion
    return "".join(_as_message(t).content for t in completion)


_ScoreItems = Callable[[list[list[Message]], list[str]], list[float]]
_ScoreTexts = Callable[[list[str]], list[float]]


def _server_scoring(
    url: str,
    token: str | None,
    timeout: float,
    normalize: bool,
    normalization: RewardNormalization | tuple[float, float] | None,
) -> tuple[_ScoreItems, _ScoreTexts]:
    """:func:`make_reward_fn`'s two scoring calls through a reward server (``POST /score``, ``/get_reward``)."""
    from dmoerm.client import RewardClient

    client = RewardClient(url, token=token, timeout=timeout)
    if normalization is not None:
        raise ValueError("normalization: cannot be given with a server URL; the server applies its own")

    def score_items(convs: list[list[Message]], resps: list[str]) -> list[float]:
        return [o.reward for o in client.score(convs, resps, normalize=normalize)]

    def score_texts(texts: list[str]) -> list[float]:
        return client.get_reward(texts, normalize=normalize)

    return score_items, score_texts


def _local_scoring(
    scorer: Any,
    normalize: bool,
    normalization: RewardNormalization | tuple[float, float] | None,
    model_dir: str | os.PathLike | None,
    batch_size: int,
) -> tuple[_ScoreItems, _ScoreTexts]:
    """:func:`make_reward_fn`'s two scoring calls on a local scorer, normalized as ``make_reward_fn`` says."""
    if not hasattr(scorer, "score") or not hasattr(scorer, "score_texts"):
        raise TypeError(
            f"scorer_or_url: {type(scorer).__name__} is neither a URL nor a Scorer (score, score_texts)"
        )
    norm: RewardNormalization | None = None
    if normalize:
        if normalization is not None:
            norm = (
                normalization
                if isinstance(normalization, RewardNormalization)
                else RewardNormalization(float(normalization[0]), float(normalization[1]))
            )
        else:
            folder = model_dir or getattr(scorer, "model_dir", None)
            norm = load_normalization(folder) if folder else None
    if norm is not None:
        logger.info("reward function normalizes rewards: mean=%.6g std=%.6g", norm.mean, norm.std)

    def score_items(convs: list[list[Message]], resps: list[str]) -> list[float]:
        raw = [float(o.reward) for o in scorer.score(convs, resps, batch_size=batch_size)]
        return norm.apply(raw) if norm is not None else raw

    def score_texts(texts: list[str]) -> list[float]:
        raw = [float(r) for r in scorer.score_texts(texts, batch_size=batch_size)]
        return norm.apply(raw) if norm is not None else raw

    return score_items, score_texts


def make_reward_fn(
    scorer_or_url: Scorer | str,
    *,
    token: str | None = None,
    normalize: bool = True,
    normalization: RewardNormalization | tuple[float, float] | None = None,
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    plain_prompts: str = "chat",
    timeout: float = 120.0,
    name: str = "dmoerm_reward",
) -> Callable[..., list[float]]:
    """A reward function for TRL's GRPOTrainer: ``fn(prompts, completions, **kwargs) -> list[float]``.

    Args:
        scorer_or_url: a local :class:`~dmoerm.outputs.Scorer`, or the base URL of a ``dmoerm`` reward server
            (e.g. ``"http://127.0.0.1:8000"``), which it calls through ``POST /score``.
        token: bearer token for the server.
        normalize: apply reward normalization. Locally: ``normalization`` if given, else
            ``model_dir/reward_normalization.json`` (``model_dir`` defaults to the scorer's ``model_dir``
            attribute) if present. Over HTTP the server applies its own normalization, so this only
            chooses between its normalized ``reward`` and its ``raw_reward``.
        normalization: explicit ``(mean, std)`` for a local scorer, overriding the file.
        model_dir: where to look for the normalization file (local scorer).
        batch_size: the scorer's forward-pass batch size (local scorer).
        plain_prompts: how plain-string prompts are scored: ``"chat"`` makes the prompt a user turn and the
            completion the assistant reply (``score``); ``"concat"`` scores ``prompt + completion`` as
            already rendered text (``score_texts``, as OpenRLHF does).
        timeout: per-request timeout in seconds (server).
        name: the function's ``__name__``, which TRL uses to label the reward in its logs.
    """
    if plain_prompts not in ("chat", "concat"):
        raise ValueError(f"plain_prompts: {plain_prompts!r} is not one of 'chat', 'concat'")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")

    if isinstance(scorer_or_url, str):
        score_items, score_texts = _server_scoring(scorer_or_url, token, timeout, normalize, normalization)
    else:
        score_items, score_texts = _local_scoring(
            scorer_or_url, normalize, normalization, model_dir, batch_size
        )

    def reward_fn(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"completions: {len(completions)} completions for {len(prompts)} prompts")
        if not prompts:
            return []
        responses = [completion_text(c) for c in completions]
        if plain_prompts == "concat" and all(isinstance(p, str) for p in prompts):
            return score_texts([p + r for p, r in zip(prompts, responses, strict=True)])
        return score_items([to_conversation(p) for p in prompts], responses)

    reward_fn.__name__ = name
    reward_fn.__qualname__ = name
    return reward_fn

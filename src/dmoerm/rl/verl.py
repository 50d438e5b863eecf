"""verl: :func:`compute_score` (and :func:`compute_score_batch`), a verl custom reward function backed by a
reward server or an in-process model."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from dmoerm.data import Message
from dmoerm.outputs import Scorer
from dmoerm.rl.normalization import load_normalization
from dmoerm.rl.reward_fn import to_conversation

VERL_URL_ENV = "DMOERM_REWARD_URL"
"""Base URL of a dmoerm reward server for :func:`compute_score` (e.g. ``http://127.0.0.1:8000``)."""
VERL_MODEL_ENV = "DMOERM_MODEL_DIR"
"""A model directory :func:`compute_score` loads in-process when no server URL is configured."""
VERL_TOKEN_ENV = "DMOERM_REWARD_TOKEN"
"""Bearer token for the server."""
VERL_PROMPT_KEYS = ("prompt", "question", "raw_prompt", "messages")
"""Keys of verl's ``extra_info`` where :func:`compute_score` looks for the prompt, in order."""

_verl_lock = threading.Lock()
_verl_backends: dict[tuple, _VerlBackend] = {}
_verl_configured: _VerlBackend | None = None


class _VerlBackend:
    """Scores (conversation, response) pairs for verl through a server or an in-process scorer."""

    def __init__(self, scorer_or_url: Scorer | str, token: str | None, normalize: bool, batch_size: int):
        self._lock = threading.Lock()  # verl calls compute_score from a thread pool
        self.categories: list[str] = []
        if isinstance(scorer_or_url, str):
            from dmoerm.client import RewardClient

            self._client = RewardClient(scorer_or_url, token=token)
            self.categories = list(self._client.health().get("categories") or [])
            self._score = lambda convs, resps: self._client.score(convs, resps, normalize=normalize)
        else:
            scorer = scorer_or_url
            if not hasattr(scorer, "score"):
                raise TypeError(f"scorer_or_url: {type(scorer).__name__} is neither a URL nor a Scorer")
            folder = getattr(scorer, "model_dir", None)
            norm = load_normalization(folder) if normalize and folder else None
            self.categories = list(getattr(scorer, "categories", None) or [])

            def score(convs: list[list[Message]], resps: list[str]) -> list:
                with self._lock:
                    outputs = list(scorer.score(convs, resps, batch_size=batch_size))
                if norm is not None:
                    for o, r in zip(outputs, norm.apply([o.reward for o in outputs]), strict=True):
                        o.reward = r
                return outputs

            self._score = score

    def score(self, convs: list[list[Message]], resps: list[str]) -> list:
        return self._score(convs, resps)


def configure_verl(
    scorer_or_url: Scorer | str | None,
    *,
    token: str | None = None,
    normalize: bool = True,
    batch_size: int = 16,
) -> None:
    """Make :func:`compute_score` use this scorer object or server URL in this process (None: unset)."""
    global _verl_configured
    with _verl_lock:
        _verl_configured = (
            None if scorer_or_url is None else _VerlBackend(scorer_or_url, token, normalize, batch_size)
        )


def _verl_backend(kwargs: Mapping[str, Any]) -> _VerlBackend:
    url, model_dir = kwargs.get("dmoerm_url"), kwargs.get("dmoerm_model_dir")
    if not (url or model_dir):
        if _verl_configured is not None:
            return _verl_configured
        url, model_dir = os.environ.get(VERL_URL_ENV), os.environ.get(VERL_MODEL_ENV)
    token = kwargs.get("dmoerm_token") or os.environ.get(VERL_TOKEN_ENV)
    normalize = bool(kwargs.get("dmoerm_normalize", True))
    key = (url, model_dir, token, normalize)
    with _verl_lock:
        if key not in _verl_backends:
            if url:
                _verl_backends[key] = _VerlBackend(url, token, normalize, 16)
            elif model_dir:
                from dmoerm.model import load_model

                scorer = load_model(model_dir)
                scorer.model_dir = str(model_dir)
                _verl_backends[key] = _VerlBackend(scorer, None, normalize, 16)
            else:
                raise ValueError(
                    f"dmoerm.rl.compute_score: no reward model configured; set {VERL_URL_ENV} (a dmoerm serve "
                    f"URL) or {VERL_MODEL_ENV} (a model directory), pass custom_reward_function.reward_kwargs."
                    "dmoerm_url / dmoerm_model_dir, or call dmoerm.rl.configure_verl(...)"
                )
        return _verl_backends[key]


def _verl_prompt(extra_info: Mapping[str, Any] | None, prompt_key: str | None) -> list[Message]:
    info = extra_info if isinstance(extra_info, Mapping) else {}
    keys = (prompt_key,) if prompt_key else VERL_PROMPT_KEYS
    for key in keys:
        prompt = info.get(key)
        if isinstance(prompt, str) and prompt.strip():
            return to_conversation(prompt)
        if (
            prompt is not None and not isinstance(prompt, str) and len(prompt) > 0
        ):  # messages (list / ndarray)
            return to_conversation(list(prompt))
    raise ValueError(
        f"extra_info: no prompt under {', '.join(repr(k) for k in keys)} (keys present: {sorted(info)}); "
        "a reward model needs the prompt: store it (a string or a list of {role, content}) in extra_info['prompt'] "
        "when preparing the verl dataset, or name its key with reward_kwargs.dmoerm_prompt_key"
    )


def _verl_result(output: Any, categories: list[str], details: bool) -> float | dict[str, float]:
    reward = float(output.reward)
    if not details:
        return reward
    # verl keeps every key of a dict score per item (reward_extra_info) and averages them in validation
    # metrics, so: numbers only, the same keys for every item.
    index = categories.index(output.category) if output.category in categories else -1
    result = {"score": reward, "category_index": float(index)}
    result["category_probability"] = float(output.category_probability or 0.0)
    for c in categories:
        result[f"category/{c}"] = 1.0 if c == output.category else 0.0
    return result


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float | dict[str, float]:
    """A verl custom reward function backed by a dmoerm reward model (``custom_reward_function.path=
    pkg://dmoerm.rl``, ``custom_reward_function.name=compute_score``).

    verl calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)``
    (verl/experimental/reward_loop/reward_manager/naive.py lines 67-83, verl/workers/reward_manager/naive.py);
    ``solution_str`` is the decoded response and the prompt is looked up in ``extra_info`` (see
    ``VERL_PROMPT_KEYS``). ``ground_truth`` and ``data_source`` are not used: the reward model judges the
    response. The model, first found: ``reward_kwargs.dmoerm_url`` (a ``dmoerm serve`` server; concurrent
    calls are merged into its dynamic batches) or ``dmoerm_model_dir`` (loaded once, in process); what
    :func:`configure_verl` set; ``$DMOERM_REWARD_URL``; ``$DMOERM_MODEL_DIR``. ``dmoerm_details=True`` returns ``{"score", "category_index",
    "category_probability", "category/<c>"...}`` instead of the float. Unknown keyword arguments (verl's
    ``reward_router_address``, ``reward_model_tokenizer``) are ignored.
    """
    conversation = _verl_prompt(extra_info, kwargs.get("dmoerm_prompt_key"))
    backend = _verl_backend(kwargs)
    output = backend.score([conversation], [str(solution_str)])[0]
    return _verl_result(output, backend.categories, bool(kwargs.get("dmoerm_details", False)))


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    **kwargs: Any,
) -> list[float | dict[str, float]]:
    """The batched form for verl's ``reward_manager=batch`` (verl/workers/reward_manager/batch.py lines
    70-76 call ``compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **kwargs)``):
    one request (or one scorer call) for the whole batch; otherwise as :func:`compute_score`."""
    if len(extra_infos) != len(solution_strs):
        raise ValueError(f"extra_infos: {len(extra_infos)} for {len(solution_strs)} solution_strs")
    prompt_key = kwargs.get("dmoerm_prompt_key")
    conversations = [_verl_prompt(info, prompt_key) for info in extra_infos]
    backend = _verl_backend(kwargs)
    outputs = backend.score(conversations, [str(s) for s in solution_strs])
    details = bool(kwargs.get("dmoerm_details", False))
    return [_verl_result(o, backend.categories, details) for o in outputs]


verl_reward_fn = compute_score
"""Alias of :func:`compute_score`."""

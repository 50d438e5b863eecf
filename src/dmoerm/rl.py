"""Rewards for RL: a TRL-style reward function backed by a Scorer or a reward server, and reward normalization.

TRL's ``GRPOTrainer`` (and ``RLOOTrainer``) call each reward function as
``reward_fn(prompts=..., completions=..., completion_ids=..., **dataset_columns_and_trainer_extras)`` and
expect one float per completion. Prompts and completions are either plain strings or, for conversational
datasets, lists of ``{"role", "content"}`` message dicts (a completion is then e.g.
``[{"role": "assistant", "content": "..."}]``). :func:`make_reward_fn` builds such a function.

verl: :func:`compute_score` (and :func:`compute_score_batch`) is a verl custom reward function backed by a
reward server or an in-process model.

Normalization: :func:`compute_normalization` measures the mean and standard deviation of a scorer's raw rewards
on a reference set and writes them to ``<model_dir>/reward_normalization.json``. The reward server and
:func:`make_reward_fn` then return ``(reward - mean) / std`` unless told not to.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoerm.data import Message
from dmoerm.outputs import Scorer

logger = logging.getLogger(__name__)

__all__ = [
    "NORMALIZATION_FILE",
    "NormalizeModelConfig",
    "RewardNormalization",
    "completion_text",
    "compute_normalization",
    "compute_score",
    "compute_score_batch",
    "configure_verl",
    "load_normalization",
    "make_reward_fn",
    "normalize_model",
    "save_normalization",
    "to_conversation",
    "verl_reward_fn",
]

NORMALIZATION_FILE = "reward_normalization.json"
"""Name of the normalization file inside a reward model directory."""

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RewardNormalization:
    """Affine reward normalization ``(r - mean) / std`` measured on a reference set."""

    mean: float
    """Mean raw reward on the reference set."""
    std: float
    """Standard deviation of the raw rewards on the reference set (> 0)."""
    count: int = 0
    """Number of reference items it was measured on."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean):
            raise ValueError(f"mean: must be finite, got {self.mean}")
        if not math.isfinite(self.std) or self.std <= 0:
            raise ValueError(f"std: must be finite and positive, got {self.std}")

    def apply(self, rewards: Sequence[float]) -> list[float]:
        """Normalize raw rewards."""
        return [(float(r) - self.mean) / self.std for r in rewards]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": _FORMAT_VERSION, "mean": self.mean, "std": self.std, "count": self.count}


def save_normalization(
    model_dir: str | os.PathLike, normalization: RewardNormalization, **extra: Any
) -> Path:
    """Write ``normalization`` (plus JSON-able ``extra`` fields) to ``model_dir/reward_normalization.json``.

    Written atomically: a temporary file in the same folder, flushed, then renamed over the target.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"model_dir: {folder} is not a directory")
    data = {**normalization.to_dict(), "created_unix": int(time.time()), **extra}
    target = folder / NORMALIZATION_FILE
    fd, tmp = tempfile.mkstemp(prefix=".reward_normalization.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise
    logger.info(
        "saved reward normalization to %s (mean=%.6g std=%.6g)", target, normalization.mean, normalization.std
    )
    return target


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def load_normalization(model_dir: str | os.PathLike) -> RewardNormalization | None:
    """Read ``model_dir/reward_normalization.json``; None when there is none.

    Raises ValueError naming the file when it exists but is malformed.
    """
    path = Path(model_dir) / NORMALIZATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RewardNormalization(
            mean=float(data["mean"]), std=float(data["std"]), count=int(data.get("count", 0))
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: malformed reward normalization ({exc}); recompute it with compute_normalization or delete it"
        ) from None


def compute_normalization(
    scorer: Scorer,
    conversations: Sequence[Sequence[Message]],
    responses: Sequence[str],
    *,
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> tuple[float, float]:
    """Measure the mean and standard deviation of ``scorer``'s raw rewards on a reference set.

    Use responses like the ones RL will produce (e.g. samples of the initial policy). When ``model_dir`` is
    given the result is saved there as ``reward_normalization.json`` (atomically), where the server and
    :func:`make_reward_fn` find it. Returns ``(mean, std)`` (population standard deviation).
    """
    if len(conversations) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(conversations)} conversations")
    if len(responses) < 2:
        raise ValueError(f"conversations: need at least 2 reference items, got {len(responses)}")
    outputs = scorer.score([list(c) for c in conversations], list(responses), batch_size=batch_size)
    rewards = [float(o.reward) for o in outputs]
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"scorer: non-finite reward for reference items {bad[:10]}")
    mean = math.fsum(rewards) / len(rewards)
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std < 1e-8:
        raise ValueError(
            f"conversations: all {len(rewards)} reference rewards are equal ({mean:.6g}); use a more varied reference set"
        )
    if model_dir is not None:
        save_normalization(model_dir, RewardNormalization(mean, std, len(rewards)))
    return mean, std


@dataclass
class NormalizeModelConfig:
    """What :func:`normalize_model` (``dmoerm normalize``) measures the reward normalization on.

    Every field is checked when the config is built.
    """

    model_dir: str = ""
    """The reward model directory (single or DMoERM); the normalization is written into it. Required."""
    source: str = "rmb/pairwise_helpfulness"
    """Reference data: a bundled preference source name (see ``dmoerm.data.SOURCES``) or the path of a
    preference JSONL file (``docs/data.md``). Every response of every sampled record is scored. Use responses
    like the ones the policy will produce."""
    limit: int = 256
    """Records sampled at random (with ``seed``) from ``source``; 0 uses every record."""
    seed: int = 0
    """Seed of the record sample."""
    batch_size: int = 16
    """The scorer's forward batch size."""
    torch_threads: int | None = None
    """If set, ``torch.set_num_threads`` before scoring; None keeps torch's default."""
    dry_run: bool = False
    """Measure and log the mean and std without writing the file."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_dir, str) or not self.model_dir.strip():
            raise ValueError("model_dir: required; pass the reward model directory, e.g. runs/main/model")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("source: required; a bundled source name or a preference JSONL path")
        for name, minimum in (("limit", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if self.torch_threads is not None and (
            isinstance(self.torch_threads, bool)
            or not isinstance(self.torch_threads, int)
            or self.torch_threads < 1
        ):
            raise ValueError(f"torch_threads: expected an integer >= 1 or None, got {self.torch_threads!r}")
        if not isinstance(self.dry_run, bool):
            raise ValueError(f"dry_run: expected True or False, got {self.dry_run!r}")


def _reference_records(config: NormalizeModelConfig) -> list:
    import random

    from dmoerm.data import SOURCES, PreferenceRecord, load_jsonl, load_source

    if config.source in SOURCES:
        records = list(load_source(config.source))
    elif Path(config.source).is_file():
        records = list(load_jsonl(config.source))
    else:
        raise ValueError(
            f"source: {config.source!r} is neither a bundled source (e.g. rmb/pairwise_helpfulness) nor a file"
        )
    records = [r for r in records if isinstance(r, PreferenceRecord)]
    if not records:
        raise ValueError(f"source: {config.source!r} holds no preference records (responses to score)")
    if config.limit and len(records) > config.limit:
        records = random.Random(config.seed).sample(records, config.limit)
    return records


def normalize_model(config: NormalizeModelConfig) -> RewardNormalization:
    """Measure a reward model's reward mean and std on reference data and store them with the model.

    Loads ``config.model_dir`` with :func:`dmoerm.model.load_model`, scores every response of the sampled
    reference records and writes ``reward_normalization.json`` into the model directory (unless
    ``dry_run``), where :func:`dmoerm.serving.serve_model` and :func:`make_reward_fn` pick it up.
    """
    from dmoerm.model import load_model

    folder = Path(config.model_dir)
    if not folder.is_dir():
        raise ValueError(f"model_dir: {folder} is not a directory")
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    records = _reference_records(config)
    conversations = [list(r.conversation) for r in records for _ in r.responses]
    responses = [resp for r in records for resp in r.responses]
    logger.info(
        "measuring reward normalization of %s on %d responses of %d records from %s",
        folder,
        len(responses),
        len(records),
        config.source,
    )
    scorer = load_model(folder)
    mean, std = compute_normalization(scorer, conversations, responses, batch_size=config.batch_size)
    norm = RewardNormalization(mean, std, len(responses))
    if config.dry_run:
        logger.info("dry run: mean=%.6g std=%.6g (not saved)", mean, std)
    else:
        save_normalization(
            folder,
            norm,
            source=config.source,
            records=len(records),
            limit=config.limit,
            seed=config.seed,
        )
    return norm


# ----------------------------------------------------------------------------------------------------------
# TRL-style inputs


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


# ----------------------------------------------------------------------------------------------------------
# verl custom reward function

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

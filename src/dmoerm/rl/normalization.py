"""Reward normalization: the mean and standard deviation of a scorer's raw rewards on a reference set.

:func:`compute_normalization` measures them and writes them to ``<model_dir>/reward_normalization.json``; the
reward server and :func:`dmoerm.rl.make_reward_fn` then return ``(reward - mean) / std`` unless told not to.
:func:`normalize_model` (``dmoerm normalize``) does it for a saved model on bundled or JSONL reference data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoerm.data import Message
from dmoerm.outputs import Scorer

logger = logging.getLogger(__name__)

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

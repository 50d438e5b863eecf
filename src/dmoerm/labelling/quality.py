"""The ``dmoerm label-quality`` command: a judge's agreement with the bundled human-labelled sets.

:class:`QualityConfig` and :func:`run_quality` sample the sets of :data:`QUALITY_SETS` (PandaLM, LLMBar,
FineGrainedRLHF overall preferences and its per-aspect labels; :func:`load_quality_sets`), build the judge
with :func:`~dmoerm.labelling.config.make_judge` and write the report of
:func:`~dmoerm.labelling.agreement.quality_report`.

The report is in :mod:`dmoerm.labelling.agreement`, the aspect labels in :mod:`dmoerm.labelling.aspects` and
the judge-as-evaluator command in :mod:`dmoerm.labelling.judge_eval`.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.agreement import quality_report
from dmoerm.labelling.aspects import FINEGRAINED_ASPECTS, finegrained_aspect_labels
from dmoerm.labelling.config import JudgeConfig
from dmoerm.labelling.pairs import LabelPair, iter_pairs
from dmoerm.labelling.schema import CapabilityLabel

__all__ = [
    "QUALITY_SETS",
    "QualityConfig",
    "load_quality_sets",
    "run_quality",
]

logger = logging.getLogger(__name__)


QUALITY_SETS = ("pandalm", "llmbar", "finegrained", "finegrained_aspects")
"""Sets with human labels that :func:`run_quality` knows:

* ``pandalm``: PandaLM test set (``pandalm/test``), majority of 3 annotators, overall preference;
* ``llmbar``: LLMBar natural + adversarial (``llmbar``), gold instruction-following label; reported as
  ``llmbar_natural`` and ``llmbar_adversarial``;
* ``finegrained``: FineGrainedRLHF qa-feedback dev (``finegrained_rlhf/qa_dev``), overall preference from the
  annotators' pairwise rankings;
* ``finegrained_aspects``: the same file's span annotations as per-capability labels (relevance, factuality,
  completeness; :func:`finegrained_aspect_labels`), reported per capability point.
"""

_SET_SOURCE = {
    "pandalm": "pandalm/test",
    "llmbar": "llmbar",
    "finegrained": "finegrained_rlhf/qa_dev",
    "finegrained_aspects": "finegrained_rlhf/qa_dev",
}


@dataclass(kw_only=True)
class QualityConfig(JudgeConfig):
    """Configuration of ``dmoerm label-quality`` (and :func:`run_quality`): the judge options of
    :class:`~dmoerm.labelling.config.JudgeConfig` plus which human-labelled sets to sample and where the
    report goes. Every field is validated on creation (``ValueError`` naming the field and the fix)."""

    out_dir: str
    """Folder for ``<name>.json`` and ``<name>.md`` (and the judge cache, unless ``cache`` is set)."""
    sets: list[str] = field(default_factory=lambda: list(QUALITY_SETS))
    """Which sets to judge: any of ``pandalm``, ``llmbar``, ``finegrained``, ``finegrained_aspects``."""
    limit: int | None = 50
    """Pairs sampled per set at most (seeded, without human ties); None for every pair."""
    seed: int = 0
    """Seed of the sample."""
    data_dir: str | None = None
    """Folder of the bundled data; None for the default (``$DMOERM_DATA_DIR`` or ``../shared/data``)."""
    name: str = "label_quality"
    """File stem of the report."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        if not self.out_dir or not str(self.out_dir).strip():
            bad("out_dir", "empty; give the folder for the report")
        if isinstance(self.sets, str):
            self.sets = [x.strip() for x in self.sets.split(",") if x.strip()]
        if not self.sets:
            bad("sets", f"no set; name at least one of {', '.join(QUALITY_SETS)}")
        for s in self.sets:
            if s not in QUALITY_SETS:
                bad("sets", f"{s!r} is not one of {', '.join(QUALITY_SETS)}")
        if len(set(self.sets)) != len(self.sets):
            bad("sets", f"{self.sets} names a set twice; name each once")
        if self.limit is not None and self.limit < 1:
            bad("limit", f"{self.limit} must be >= 1 (or None for every pair)")
        if self.data_dir is not None and not str(self.data_dir).strip():
            bad("data_dir", "empty; give the data folder or leave it unset for the default")
        if not self.name or any(c in self.name for c in "/\\\0") or self.name in (".", ".."):
            bad("name", f"{self.name!r} must be a plain file stem such as label_quality")
        super().__post_init__()

    def cache_path(self) -> str:
        """``cache``, or ``<out_dir>/judge_cache.sqlite``."""
        return self.cache or str(Path(self.out_dir) / "judge_cache.sqlite")


def _sample(items: list, limit: int | None, rng: random.Random) -> list:
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), limit))]


def _maybe_swap(pair: LabelPair, rng: random.Random) -> LabelPair:
    if rng.random() < 0.5:
        return pair
    human = {"a": "b", "b": "a"}.get(pair.human or "", pair.human)
    return replace(pair, response_a=pair.response_b, response_b=pair.response_a, human=human)


def _llmbar_source(source: str) -> str:
    return "llmbar_natural" if source.endswith("natural") else "llmbar_adversarial"


def load_quality_sets(
    sets: Sequence[str],
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[list[LabelPair], list[CapabilityLabel], dict]:
    """The pairs (overall preference) and per-capability human labels of ``sets`` (see :data:`QUALITY_SETS`),
    ``limit`` pairs per set sampled with ``seed`` among pairs without a human tie.

    The bundled loaders put the preferred response first; which response of a sampled pair becomes
    ``response_a`` is drawn at random (seeded), so that the single-order agreement is not inflated by a judge
    that always prefers position 1.

    Returns (pairs, human capability labels, {set: {"available": n, "sampled": n}}).
    """
    from dmoerm.data import load_source

    rng = random.Random(seed)
    swap_rng = random.Random(seed + 7919)  # separate stream: the sample does not depend on the swaps
    loaded: dict[str, list[PreferenceRecord]] = {}
    pairs: list[LabelPair] = []
    labels: list[CapabilityLabel] = []
    sizes: dict = {}
    for name in sets:
        if name not in QUALITY_SETS:
            raise ValueError(f"sets: {name!r} is not one of {', '.join(QUALITY_SETS)}")
        src = _SET_SOURCE[name]
        if src not in loaded:
            loaded[src] = list(load_source(src, data_dir))
        records = loaded[src]
        if name == "finegrained_aspects":
            groups: dict[tuple, list[CapabilityLabel]] = defaultdict(list)
            for lab in finegrained_aspect_labels(records):
                groups[(lab.conversation, lab.response_a, lab.response_b)].append(lab)
            chosen = _sample(list(groups), limit, rng)
            labels += [lab for key in chosen for lab in groups[key]]
            sizes[name] = {"available": len(groups), "sampled": len(chosen), "labels": len(labels)}
            continue
        candidates = [p for p in iter_pairs(records) if p.human in ("a", "b")]
        if name == "llmbar":
            candidates = [replace(p, source=_llmbar_source(p.source)) for p in candidates]
        chosen = [_maybe_swap(p, swap_rng) for p in _sample(candidates, limit, rng)]
        pairs += chosen
        sizes[name] = {"available": len(candidates), "sampled": len(chosen)}
    return pairs, labels, sizes


def run_quality(config: QualityConfig) -> dict:
    """The ``dmoerm label-quality`` command: sample the human-labelled sets, judge them with the judge that
    :func:`~dmoerm.labelling.config.make_judge` builds from ``config``, write ``<out_dir>/<name>.json`` and
    ``.md`` (:func:`quality_report`) and return the report.

    The judge cache (``<out_dir>/judge_cache.sqlite`` by default) makes a rerun free; the speed figures are
    then those of the cache, so delete it (or set ``cache``) to measure the judge.
    """
    if not isinstance(config, QualityConfig):
        raise TypeError(f"config: expected a QualityConfig, got {type(config).__name__}")
    from dmoerm.labelling.config import make_judge

    pairs, human, sizes = load_quality_sets(config.sets, config.limit, config.seed, config.data_dir)
    logger.info(
        "label quality on %s",
        ", ".join(f"{k}: {v['sampled']} of {v['available']} pairs" for k, v in sizes.items()),
    )
    judge = make_judge(config)
    public = asdict(config)
    return quality_report(
        pairs,
        judge,
        config.out_dir,
        human_labels=human,
        capabilities=FINEGRAINED_ASPECTS,
        language=config.language,
        min_margin=config.min_margin,
        name=config.name,
        progress=config.progress,
        extra={"sets": sizes, "config": public},
    )

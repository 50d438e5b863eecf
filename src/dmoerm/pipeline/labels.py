"""The labelling stage's helpers: the run's judge (built once, shared by every category), the labels a
category's experts may train on, and the taxonomy that sends every capability point to the judge."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from dmoerm.config_check import RunStopped
from dmoerm.data import PreferenceRecord, conversation_key
from dmoerm.pipeline.config import PipelineConfig, judge_label_config

logger = logging.getLogger(__name__)


class _Labeller:
    """The run's LLM judge, built on first use and shared by every category (one model load, one SQLite
    cache in ``labels/``: a rerun asks nothing twice)."""

    def __init__(self, config: PipelineConfig, taxonomy, folder: Path, progress: bool):
        self.config, self.taxonomy, self.folder, self.progress = config, taxonomy, folder, progress
        self.labeller = None

    def __call__(self, records: Sequence[PreferenceRecord], path: Path) -> dict:
        """Judge the records' pairs per capability point of their category into ``path``; the stats."""
        if self.config.labels.source == "file":
            return {"source": self.config.labels.file}
        from dmoerm.labelling.pipeline import Labeller

        if self.labeller is None:
            cache = str(self.folder / "judge.cache.sqlite")
            judge_config = judge_label_config(self.config.labels, cache, self.config.model.backbone)
            self.labeller = Labeller(judge_config, self.taxonomy, progress=self.progress)
        stats = self.labeller.label(list(records), path, max_pairs_per_record=1)
        return self._check_failures(stats.to_dict(), path)

    def _check_failures(self, stats: dict, path: Path) -> dict:
        """Stop the run when more of the questions failed than ``labels.max_failed_share`` allows; mark the
        stats ``degraded`` when some failed within it (a failed question is never cached: a rerun asks it)."""
        failed, questions = stats.get("failed", 0), stats.get("questions", 0)
        if not failed:
            return stats
        allowed = self.config.labels.max_failed_share
        judge = self.labeller.config
        where = judge.base_url if judge.backend == "openai" else "the local judge"
        if failed > allowed * questions:
            raise RunStopped(
                f"labels/{path.stem}: {failed} of {questions} judge questions failed after their retries "
                f"(judge at {where}); labelling is not marked finished. Rerun when the judge is back: only the "
                f"failed questions are asked again (answers are cached in {self.folder / 'judge.cache.sqlite'}). "
                f"To go on without them, set labels.max_failed_share (now {allowed}) to at least "
                f"{failed / questions:.2f}."
            )
        logger.warning(
            "%s: %d of %d judge questions failed (judge at %s); going on degraded as labels.max_failed_share "
            "= %s allows",
            path.stem,
            failed,
            questions,
            where,
            allowed,
        )
        return dict(stats, degraded=True)


def _read_category_labels(config: PipelineConfig, path: Path, category: str | None, held_out: set[tuple]):
    """The category's labels (every label when ``category`` is None), minus any on a prompt that phase 3, dev
    or test use.

    A label file given by the user may cover prompts this run holds out; training an expert on them would
    leak into phase 3 and the evaluation (the paper keeps the phases' data disjoint), so they are dropped.
    """
    from dmoerm.labelling.schema import read_labels

    source = Path(config.labels.file) if config.labels.source == "file" else path
    if not source.exists():
        return []
    labels = [lab for lab in read_labels(source) if category is None or lab.category in (category, None)]
    kept = [lab for lab in labels if conversation_key(lab.conversation) not in held_out]
    if len(kept) < len(labels):
        logger.info(
            "%s: dropped %d of %d labels whose prompt is held out for phase 3, dev or test",
            category,
            len(labels) - len(kept),
            len(labels),
        )
    return kept


def _judge_only(taxonomy):
    """The taxonomy with every capability point's label source set to the judge."""
    cats = tuple(
        dataclasses.replace(
            c, capabilities=tuple(dataclasses.replace(p, label_source="judge") for p in c.capabilities)
        )
        for c in taxonomy.categories
    )
    return dataclasses.replace(taxonomy, categories=cats)

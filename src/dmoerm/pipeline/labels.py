"""The labelling stage's helpers: the run's judge (built once, shared by every category), the labels a
category's experts may train on, and the taxonomy that sends every capability point to the judge."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from dmoerm.config_check import RunStopped
from dmoerm.data import PreferenceRecord
from dmoerm.pipeline.config import PipelineConfig, judge_label_config
from dmoerm.pipeline.splits import prompt_key

logger = logging.getLogger(__name__)


class _Labeller:
    """The run's LLM judge, built on first use and shared by every category (one model load, one SQLite
    cache in ``labels/``: a rerun asks nothing twice)."""

    def __init__(self, config: PipelineConfig, taxonomy, folder: Path, progress: bool):
        self.config, self.taxonomy, self.folder, self.progress = config, taxonomy, folder, progress
        self.judge = None

    def __call__(self, records: Sequence[PreferenceRecord], path: Path) -> dict:
        """Judge the records' pairs per capability point of their category into ``path``; the stats."""
        if self.config.labels.source == "file":
            return {"source": self.config.labels.file}
        from dmoerm.labelling.pipeline import label_pairs, make_judge

        backend = "openai" if self.config.labels.source == "openai" else "local"
        self.judge_config = judge_label_config(
            self.config.labels, str(path), str(self.folder / "judge.cache.sqlite")
        )
        if backend == "local" and self.judge_config.model is None:
            backbone = self.config.model.backbone
            self.judge_config.model = None if backbone == "default" else backbone
        if self.judge is None:
            self.judge = make_judge(self.judge_config)
        stats = label_pairs(
            list(records),
            self.taxonomy,
            self.judge,
            path,
            consistency=self.judge_config.consistency,
            min_margin=self.judge_config.min_margin,
            language=self.judge_config.language,
            max_pairs_per_record=1,
            progress=self.progress,
        )
        return self._check_failures(stats.to_dict(), path)

    def _check_failures(self, stats: dict, path: Path) -> dict:
        """Stop the run when more of the questions failed than ``labels.max_failed_share`` allows; mark the
        stats ``degraded`` when some failed within it (a failed question is never cached: a rerun asks it)."""
        failed, questions = stats.get("failed", 0), stats.get("questions", 0)
        if not failed:
            return stats
        allowed = self.config.labels.max_failed_share
        where = self.judge_config.base_url if self.judge_config.backend == "openai" else "the local judge"
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
    kept = [lab for lab in labels if prompt_key(lab.conversation) not in held_out]
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

"""``dmoerm eval``: score a saved model's responses through the :class:`~dmoerm.outputs.Scorer` protocol and
measure them with :func:`~dmoerm.evaluation.metrics.compute_metrics`.

:func:`evaluate` is a thin driver over any Scorer (one ``score`` call, timed); :func:`run_eval` loads the model
and the data of an :class:`EvalConfig` and writes ``eval.json`` / ``eval.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dmoerm.data import Message, PreferenceRecord
from dmoerm.evaluation.metrics import compute_metrics, response_token_lengths
from dmoerm.evaluation.results import EvalResult, Throughput, write_eval
from dmoerm.outputs import RewardOutput, Scorer

logger = logging.getLogger(__name__)


def _flatten_responses(records: Sequence[PreferenceRecord]) -> tuple[list[list[Message]], list[str]]:
    """One (conversation, response) row per response of every record, in record order."""
    conversations: list[list[Message]] = []
    responses: list[str] = []
    for rec in records:
        conv = list(rec.conversation)
        for r in rec.responses:
            conversations.append(conv)
            responses.append(r)
    return conversations, responses


def _rewards_by_record(
    outputs: Sequence[RewardOutput], records: Sequence[PreferenceRecord]
) -> tuple[list[list[float]], list[RewardOutput]]:
    """The flat outputs cut back into one reward list per record, and each record's first output."""
    rewards: list[list[float]] = []
    first_out: list[RewardOutput] = []
    k = 0
    for rec in records:
        m = len(rec.responses)
        rewards.append([float(o.reward) for o in outputs[k : k + m]])
        first_out.append(outputs[k])
        k += m
    return rewards, first_out


def _resolve_categories(
    categories: Sequence[str | None] | Literal["record", "scorer", "auto"] | None,
    records: Sequence[PreferenceRecord],
    first_out: Sequence[RewardOutput],
) -> tuple[Sequence[str | None] | None, str]:
    """The per-record categories for :func:`compute_metrics` (None: the records' own) and where they came from."""
    if isinstance(categories, str):
        if categories == "scorer":
            return [o.category for o in first_out], "scorer"
        if categories == "auto":
            # The rule: the file's category, else the router's choice.
            return [rec.category or o.category for rec, o in zip(records, first_out)], "record, else scorer"
        if categories != "record":
            raise ValueError(f"categories: use a list, 'record', 'scorer' or 'auto', got {categories!r}")
        return None, "record"
    if categories is not None:
        return categories, "given"
    return None, "record"


def evaluate(
    scorer: Scorer,
    records: Sequence[PreferenceRecord],
    batch_size: int = 16,
    categories: Sequence[str | None] | Literal["record", "scorer", "auto"] | None = None,
    *,
    token_lengths: Sequence[Sequence[int]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_bon_responses: int = 3,
    system: str = "",
    meta: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Score every response of every record with ``scorer`` in one call and compute :func:`compute_metrics`.

    ``categories``: None or ``"record"`` uses ``record.category``; a list gives one category per record;
    ``"scorer"`` uses the category the scorer reports for the record's first response
    (``RewardOutput.category``, the DMoERM router's choice); ``"auto"`` uses the record's own category and
    the scorer's where the record has none.
    Throughput is the wall time of the ``scorer.score`` call (``time.perf_counter``), including any warm-up
    the scorer does on its first batch.
    """
    records = list(records)
    conversations, responses = _flatten_responses(records)
    n_pairs = sum(len(rec.pairs()) for rec in records)
    logger.info(
        "scoring %d responses of %d records (%d pairs), batch size %d",
        len(responses),
        len(records),
        n_pairs,
        batch_size,
    )
    start = time.perf_counter()
    outputs = scorer.score(conversations, responses, batch_size=batch_size)
    seconds = time.perf_counter() - start
    if len(outputs) != len(responses):
        raise ValueError(f"scorer returned {len(outputs)} outputs for {len(responses)} responses")
    rewards, first_out = _rewards_by_record(outputs, records)
    cats, source = _resolve_categories(categories, records, first_out)
    result = compute_metrics(
        rewards,
        records,
        categories=cats,
        token_lengths=token_lengths,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        min_bon_responses=min_bon_responses,
        system=system,
    )
    result.category_source = source
    safe = seconds if seconds > 0 else math.nan
    result.throughput = Throughput(
        seconds=seconds,
        responses_per_second=len(responses) / safe,
        pairs_per_second=n_pairs / safe,
        batch_size=batch_size,
    )
    result.meta = dict(meta or {})
    a = result.overall.agreement
    logger.info(
        "agreement %.4f [%.4f, %.4f] on %d pairs; %.1f responses/s",
        a.value,
        a.ci_low,
        a.ci_high,
        a.n,
        result.throughput.responses_per_second,
    )
    return result


@dataclass
class EvalConfig:
    """``dmoerm eval``: agreement of a saved model (single reward model or DMoERM) with human labels."""

    model: str
    """A model directory written by ``save_pretrained`` (either kind; :func:`dmoerm.model.load_model`)."""
    data: list[str]
    """Bundled source names (``rmb/pairwise``, ``pandalm/test``, ...) or files (JSONL, JSON, Parquet, a
    ``datasets`` folder, ``folder:split``) in the documented schema or TRL's preference formats."""
    out: str | None = None
    """Folder for ``eval.json`` and ``eval.md``; None writes nothing (the table is still logged and returned)."""
    taxonomy: str | None = None
    """Taxonomy that maps the data's own category labels onto categories; None uses the model's taxonomy
    (DMoERM) or the ``default`` preset (single reward model)."""
    categories: str = "auto"
    """Per-category rows by ``auto`` (the record's category, else the router's), ``record`` or ``scorer``."""
    limit: int | None = None
    """Records per data source at most (the first ones); None for all."""
    batch_size: int = 16
    """Responses per forward pass."""
    n_resamples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap."""
    skip_bad: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    system: str | None = None
    """Row label in comparison tables; None uses the model folder's name."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.model:
            raise ValueError("model: give the model directory to evaluate")
        if not self.data:
            raise ValueError("data: name at least one source (e.g. rmb/pairwise) or JSONL file")
        if self.categories not in ("auto", "record", "scorer"):
            raise ValueError(f"categories: {self.categories!r} is not one of auto, record, scorer")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: {self.limit} must be >= 1, or None for all records")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1")
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples: {self.n_resamples} must be >= 0 (0 skips the intervals)")


def load_eval_records(
    data: Sequence[str],
    taxonomy,
    data_dir: str | None = None,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
) -> list[PreferenceRecord]:
    """Preference records of every source or file in ``data``, categories mapped by ``taxonomy`` (None: left
    as the files give them); a file of prompts without responses, or one with no record at all (empty,
    blank lines only, every line skipped), is an error naming it (``dmoerm eval`` and ``dmoerm eval-judge``)."""
    from dmoerm.data import load_data
    from dmoerm.taxonomy import assign_categories

    if isinstance(data, str) or not data:
        raise ValueError(f"data: {data!r}; give a list of one or more sources or files")
    records: list[PreferenceRecord] = []
    for name in data:
        loaded = load_data(name, data_dir, skip_bad=skip_bad, limit=limit)
        if not loaded:
            skipped = f" ({loaded.report.skipped} bad line(s) skipped)" if loaded.report.skipped else ""
            raise ValueError(f"data: {name}: no records to evaluate{skipped}; is it empty or blank?")
        if not isinstance(loaded[0], PreferenceRecord):
            raise ValueError(f"data: {name!r} holds prompts without responses; evaluation needs preferences")
        records.extend(loaded if taxonomy is None else assign_categories(loaded, taxonomy))
    return records


class _ShardedScorer:
    """A scorer under several processes: each rank scores its contiguous share of the responses, and every
    rank gets all the outputs in their order (so every rank computes the same metrics)."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def score(self, conversations, responses, batch_size: int = 16) -> list[RewardOutput]:
        from dmoerm.training.distributed import gather_lists, rank_and_world, share

        rank, world = rank_and_world()
        mine = share(len(responses), rank, world)
        part = []
        if len(mine):
            part = self.scorer.score(
                conversations[mine.start : mine.stop],
                responses[mine.start : mine.stop],
                batch_size=batch_size,
            )
        return gather_lists(part)


def run_eval(config: EvalConfig) -> EvalResult:
    """Load the model and the data, score every response, write ``eval.json``/``eval.md`` to ``config.out``.

    Under several processes (``accelerate launch``, torchrun) each rank scores its share of the responses
    (:class:`_ShardedScorer`), every rank computes the same result and rank 0 alone writes it."""
    from dmoerm.model import DMoERM, load_model
    from dmoerm.taxonomy import assign_categories, load_taxonomy
    from dmoerm.training.distributed import is_main_process, launched_world, process_accelerator

    sharded = launched_world() > 1
    if sharded:
        process_accelerator()  # joins the launch's process group (and picks this rank's GPU) before the model

    # The data first: a bad or empty file fails in a second, before the model loads.
    records = load_eval_records(
        config.data, None, config.data_dir, limit=config.limit, skip_bad=config.skip_bad
    )
    model = load_model(config.model)
    if config.taxonomy is not None:
        taxonomy = load_taxonomy(config.taxonomy)
    elif isinstance(model, DMoERM):
        taxonomy = model.taxonomy
    else:
        taxonomy = load_taxonomy("default")
    records = assign_categories(records, taxonomy)
    result = evaluate(
        _ShardedScorer(model) if sharded else model,
        records,
        batch_size=config.batch_size,
        categories=config.categories,
        token_lengths=response_token_lengths(model.tokenizer, records),
        n_resamples=config.n_resamples,
        seed=config.seed,
        system=config.system or Path(config.model).name,
        meta={"model": str(config.model), "data": list(config.data), "limit": config.limit},
    )
    if config.out and is_main_process():
        write_eval(result, config.out)
    return result

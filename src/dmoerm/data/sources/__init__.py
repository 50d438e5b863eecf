"""The bundled public sets: one parser module each, and the registry of names :func:`load_source` accepts.

:data:`SOURCES` lists every name (single sources and :data:`SOURCE_GROUPS`); each single source is a
``_Spec``: its file under the data folder (:func:`default_data_dir`), its record type and its parser.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dmoerm.data.files import resolve
from dmoerm.data.jsonl import load_file
from dmoerm.data.reader import Parser, _check_limit, _log_report, _read
from dmoerm.data.records import LoadReport, RecordList
from dmoerm.data.sources import (
    alignbench,
    arena_hard,
    autoj,
    finegrained,
    hh_rlhf,
    llmbar,
    pandalm,
    rmb,
    zh,
)

DATA_DIR_ENV = "DMOERM_DATA_DIR"
"""Environment variable naming the data folder (the one holding ``rmb/``, ``autoj_scenarios/``, ...)."""


@dataclass(frozen=True)
class _Spec:
    file: str
    kind: str  # "preference" | "prompt"
    description: str
    make: Callable[[str, LoadReport], Parser]


_SPECS: dict[str, _Spec] = {
    "rmb/pairwise_helpfulness": _Spec(
        "rmb/pairwise_helpfulness.jsonl.gz",
        "preference",
        "RMB pairwise helpfulness: chosen/reject pairs, multi-turn; category = subset "
        "('Helpfulness/<task>/<scenario>')",
        lambda s, r: rmb.pairwise_parser(s),
    ),
    "rmb/pairwise_harmlessness": _Spec(
        "rmb/pairwise_harmlessness.jsonl.gz",
        "preference",
        "RMB pairwise harmlessness: chosen/reject pairs; category = subset ('Harmlessness/S1'..'S11', 'multi')",
        lambda s, r: rmb.pairwise_parser(s),
    ),
    "rmb/bon_helpfulness": _Spec(
        "rmb/bon_helpfulness.jsonl.gz",
        "preference",
        "RMB best-of-n helpfulness: [bon_best] + losers, ranks (0, 1, 1, ...); category = subset",
        lambda s, r: rmb.bon_parser(s),
    ),
    "rmb/bon_harmlessness": _Spec(
        "rmb/bon_harmlessness.jsonl.gz",
        "preference",
        "RMB best-of-n harmlessness: [bon_best] + losers, ranks (0, 1, 1, ...); category = subset",
        lambda s, r: rmb.bon_parser(s),
    ),
    "autoj/train": _Spec(
        "autoj_scenarios/train.jsonl.gz",
        "prompt",
        "Auto-J scenario classifier train prompts; category = one of 58 scenarios (or 'default')",
        lambda s, r: autoj.parser(s, "train"),
    ),
    "autoj/test": _Spec(
        "autoj_scenarios/test.jsonl.gz",
        "prompt",
        "Auto-J scenario classifier test prompts; category = one of 58 scenarios (or 'default')",
        lambda s, r: autoj.parser(s, "test"),
    ),
    "pandalm/test": _Spec(
        "pandalm/testset.jsonl.gz",
        "preference",
        "PandaLM test set: pairs judged by 3 annotators, majority vote (no majority or a 0 majority = tie)",
        pandalm.parser,
    ),
    **{
        f"llmbar/{name}": _Spec(
            f"llmbar/{name}.jsonl.gz",
            "preference",
            f"LLMBar {name.replace('_', ' ')}: instruction-following pairs with a gold label",
            (lambda n: lambda s, r: llmbar.parser(s, n))(name),
        )
        for name in (
            "natural",
            "adversarial_neighbor",
            "adversarial_gptinst",
            "adversarial_gptout",
            "adversarial_manual",
        )
    },
    "hh_rlhf/harmless_base_test": _Spec(
        "hh_rlhf/harmless_base_test.jsonl.gz",
        "preference",
        "Anthropic hh-rlhf harmless-base test: multi-turn dialogues, last assistant turns compared; "
        "category 'harmless-base'",
        lambda s, r: hh_rlhf.parser(s, "harmless-base"),
    ),
    "finegrained_rlhf/qa_dev": _Spec(
        "finegrained_rlhf/qa_dev_feedback.jsonl.gz",
        "preference",
        "FineGrainedRLHF qa-feedback dev: question + passages, 4 answers ranked from 6 pairwise preferences "
        "(pairs when inconsistent); span feedback on answer 1 in meta; category 'long_form_qa'",
        lambda s, r: finegrained.parser(s),
    ),
    "zh_pairs/llamafactory_en": _Spec(
        "zh_pairs/llamafactory_dpo_en_demo.jsonl.gz",
        "preference",
        "LLaMA-Factory DPO English demo pairs (model-labelled)",
        lambda s, r: zh.parser(s, "llamafactory_dpo_en_demo", "en"),
    ),
    "zh_pairs/llamafactory_zh": _Spec(
        "zh_pairs/llamafactory_dpo_zh_demo.jsonl.gz",
        "preference",
        "LLaMA-Factory DPO Chinese demo pairs (model-labelled)",
        lambda s, r: zh.parser(s, "llamafactory_dpo_zh_demo", "zh"),
    ),
    "zh_pairs/medicalgpt_zh": _Spec(
        "zh_pairs/medicalgpt_dpo_zh_500.jsonl.gz",
        "preference",
        "MedicalGPT DPO Chinese pairs (model-labelled)",
        lambda s, r: zh.parser(s, "medicalgpt_dpo_zh_500", "zh"),
    ),
    "arena_hard/v0.1": _Spec(
        "arena_hard/arena-hard-v0.1_questions.jsonl.gz",
        "prompt",
        "Arena-Hard v0.1 prompts; category 'arena-hard-v0.1' (topic cluster in meta)",
        lambda s, r: arena_hard.parser(s),
    ),
    "arena_hard/v2.0": _Spec(
        "arena_hard/arena-hard-v2.0_questions.jsonl.gz",
        "prompt",
        "Arena-Hard v2.0 prompts; category '<category>/<subcategory>', e.g. 'hard_prompt/coding'",
        lambda s, r: arena_hard.parser(s),
    ),
    "alignbench": _Spec(
        "alignbench/prompts.jsonl.gz",
        "prompt",
        "AlignBench Chinese prompts; category '<category>/<subcategory>', reference answer in meta",
        lambda s, r: alignbench.parser(s),
    ),
}

SOURCE_GROUPS: dict[str, tuple[str, ...]] = {
    "rmb": tuple(n for n in _SPECS if n.startswith("rmb/")),
    "rmb/pairwise": ("rmb/pairwise_helpfulness", "rmb/pairwise_harmlessness"),
    "rmb/bon": ("rmb/bon_helpfulness", "rmb/bon_harmlessness"),
    "autoj": ("autoj/train", "autoj/test"),
    "llmbar": tuple(n for n in _SPECS if n.startswith("llmbar/")),
    "llmbar/adversarial": tuple(n for n in _SPECS if n.startswith("llmbar/adversarial_")),
    "zh_pairs": tuple(n for n in _SPECS if n.startswith("zh_pairs/")),
    "arena_hard": ("arena_hard/v0.1", "arena_hard/v2.0"),
}
"""Names that load several sources at once, in this order."""

SOURCES: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()} | {
    group: "all of: " + ", ".join(members) for group, members in SOURCE_GROUPS.items()
}
"""Every name :func:`load_source` accepts (single sources and groups) -> a one-line description."""


def source_kind(name: str) -> str:
    """``"preference"`` or ``"prompt"``: the record type :func:`load_source` returns for ``name``."""
    members = SOURCE_GROUPS.get(name, (name,))
    for m in members:
        if m not in _SPECS:
            raise KeyError(_unknown_source(name))
    return _SPECS[members[0]].kind


def source_file(name: str) -> str:
    """The file of a single source, relative to the data folder."""
    if name not in _SPECS:
        raise KeyError(_unknown_source(name))
    return _SPECS[name].file


def _unknown_source(name: str) -> str:
    return f"unknown source {name!r}; known: {', '.join(SOURCES)}"


def default_data_dir() -> Path:
    """The data folder: ``$DMOERM_DATA_DIR``, else the first of ``./shared/data``, ``../shared/data``.

    Raises :class:`FileNotFoundError` saying how to set it when none exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env}: not a folder; point it at the data folder")
        return p
    for cand in (Path("shared/data"), Path("../shared/data")):
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(
        f"no data folder: set {DATA_DIR_ENV} to the folder holding rmb/, autoj_scenarios/, ... "
        f"(or pass data_dir=); looked for ./shared/data and ../shared/data from {Path.cwd()}"
    )


def load_source(
    name: str,
    data_dir: str | Path | None = None,
    *,
    skip_bad: bool = False,
    limit: int | None = None,
) -> RecordList:
    """Load a bundled source (or a group of sources) by name; see :data:`SOURCES`.

    Returns a :class:`RecordList` of :class:`PreferenceRecord` or :class:`PromptRecord`
    (:func:`source_kind`) whose ``.report`` says how many lines were skipped or dropped. ``limit`` keeps the
    first ``limit`` records (over the whole group). Record ``category`` is the source's own label (map it onto
    a taxonomy with :func:`dmoerm.taxonomy.assign_categories`). A bad line raises :class:`DataError` unless
    ``skip_bad``; known upstream defects (empty model outputs, identical responses ranked differently) are
    always dropped, logged and counted (``docs/data.md``).
    """
    if name not in SOURCES:
        raise KeyError(_unknown_source(name))
    _check_limit(limit)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    members = SOURCE_GROUPS.get(name, (name,))
    total = LoadReport(source=name)
    out: list = []
    for member in members:
        remaining = None if limit is None else limit - len(out)
        if remaining is not None and remaining <= 0:
            break
        spec = _SPECS[member]
        path = root / spec.file
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing file of source {member!r}; is {root} the data folder? "
                f"(set {DATA_DIR_ENV} or pass data_dir=)"
            )
        report = LoadReport(source=member)
        records = _read(
            path,
            spec.file,
            spec.make(member, report),
            skip_bad=skip_bad,
            limit=remaining,
            report=report,
        )
        report.loaded = len(records)
        _log_report(report)
        out.extend(records)
        total.merge(report)
    return RecordList(out, total)


def load_data(
    name: str | Path,
    data_dir: str | Path | None = None,
    *,
    skip_bad: bool = False,
    limit: int | None = None,
) -> RecordList:
    """A bundled source or group by name (:func:`load_source`), else a user's file or ``datasets`` folder
    (:func:`load_file`: JSONL, JSON, Parquet, ``folder[:split]``).

    Every command that takes ``--data`` goes through here, so a source name and a file path work alike.
    """
    if str(name) in SOURCES:
        return load_source(str(name), data_dir, skip_bad=skip_bad, limit=limit)
    if resolve(name) is not None:
        return load_file(name, skip_bad=skip_bad, limit=limit)
    raise FileNotFoundError(
        f"{name}: neither a bundled source ({', '.join(sorted(SOURCE_GROUPS))}, ... see dmoerm.data.SOURCES) "
        "nor an existing file (JSONL, JSON, Parquet) or datasets folder (FOLDER or FOLDER:SPLIT)"
    )

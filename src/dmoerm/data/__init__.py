"""Preference data: one record type for every source, loaders, and prompt-disjoint splits.

* :mod:`~dmoerm.data.records`: :class:`PreferenceRecord`, :class:`PromptRecord`, :class:`Message`, the load
  report, and the prompt keys (:func:`prompt_key`, :func:`conversation_key`);
* :mod:`~dmoerm.data.jsonl`: :func:`load_file` / :func:`save_jsonl` read and write users' own files in the
  documented schema (``docs/data.md``) or TRL's, from any container :mod:`~dmoerm.data.files` reads (JSON
  lines, JSON, Parquet, ``datasets`` folders);
* :mod:`~dmoerm.data.sources`: :func:`load_source` reads one of the bundled public sets (names in
  :data:`SOURCES`, one parser module each) from the data folder (:func:`default_data_dir`); :func:`load_data`
  takes a source name or a file;
* :mod:`~dmoerm.data.splits`: :func:`split_by_prompt` makes deterministic, prompt-disjoint splits;
  :mod:`~dmoerm.data.noise`: :func:`with_label_noise` flips a seeded share of labels.

Bad input raises :class:`DataError` naming the file, the line and the field (:mod:`~dmoerm.data.fields`,
:mod:`~dmoerm.data.reader`); with ``skip_bad=True`` bad lines are skipped, logged and counted in the
:class:`LoadReport` attached to the returned :class:`RecordList`.
"""

from __future__ import annotations

from dmoerm.data.fields import LINE
from dmoerm.data.files import FileProblem, Row, RowProblem, display_name, file_format, iter_rows, resolve
from dmoerm.data.jsonl import load_file, load_jsonl, save_jsonl
from dmoerm.data.noise import with_label_noise
from dmoerm.data.reader import Parser
from dmoerm.data.records import (
    ROLES,
    DataError,
    LoadReport,
    Message,
    PreferenceRecord,
    PromptRecord,
    Record,
    RecordList,
    conversation_key,
    prompt_key,
)
from dmoerm.data.sources import (
    DATA_DIR_ENV,
    SOURCE_GROUPS,
    SOURCES,
    default_data_dir,
    load_data,
    load_source,
    source_file,
    source_kind,
)
from dmoerm.data.splits import split_by_prompt

__all__ = [
    # records
    "ROLES",
    "DataError",
    "LoadReport",
    "Message",
    "PreferenceRecord",
    "PromptRecord",
    "Record",
    "RecordList",
    "conversation_key",
    "prompt_key",
    # reading rows
    "LINE",
    "Parser",
    # containers (formerly dmoerm.data_files)
    "FileProblem",
    "Row",
    "RowProblem",
    "display_name",
    "file_format",
    "iter_rows",
    "resolve",
    # users' files
    "load_file",
    "load_jsonl",
    "save_jsonl",
    # bundled sources
    "DATA_DIR_ENV",
    "SOURCE_GROUPS",
    "SOURCES",
    "default_data_dir",
    "load_data",
    "load_source",
    "source_file",
    "source_kind",
    # splits and noise
    "split_by_prompt",
    "with_label_noise",
]

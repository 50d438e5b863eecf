"""Where the rows of a user's data come from: JSON-lines, JSON, Parquet files and ``datasets`` folders.

:func:`iter_rows` turns any of them into ``(where, position, value)`` triples that :mod:`dmoerm.data` parses
into records, so every container gets the same schema, the same ``skip_bad`` and the same
``file:line: field 'x': problem`` errors:

* JSON lines (``.jsonl``, anything unrecognised; gzip when the name ends with ``.gz``): one value per line;
  ``where`` and ``position`` are the line number;
* JSON (``.json``/``.json.gz``): a list of objects, or an object whose ``"data"`` member is that list; the
  position is the line where each element starts (a ``.json`` file of JSON lines is read as JSON lines);
* Parquet (``PAR1`` magic, any name): ``where`` is ``row <i>``, the 0-based row index;
* a ``datasets.Dataset.save_to_disk`` folder, or a ``DatasetDict`` one (``folder:split``, default ``train``).

Each line is decoded on its own, so a byte that is not UTF-8 names its own line; a lone UTF-16 surrogate
(``"\\ud800"`` escaped in JSON: not text any tokenizer or file can hold) is a bad row naming its field.
Arrow containers fill a column a row lacks with null: those nulls are dropped, as if the key were absent.
Nothing here imports ``pyarrow`` or ``datasets`` until such a file is read.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = tuple[str, int, Any]
"""``(where, position, value)``: ``where`` goes in messages (``"12"`` or ``"row 3"``), ``position`` is the
line number or row index (the default ``uid``), ``value`` the parsed row or a :class:`RowProblem`."""


@dataclass(frozen=True)
class RowProblem:
    """A row that could not be parsed (malformed JSON, invalid text): bad input, skippable with ``skip_bad``."""

    field: str | None
    """The field at fault, or None for the whole row."""
    problem: str


class FileProblem(Exception):
    """The container cannot be read from ``where`` on (not UTF-8, not gzip, not Parquet, malformed JSON
    document), or at all (``where`` None: no such split, a missing package): always an error."""

    def __init__(self, where: str | None, problem: str) -> None:
        super().__init__(problem)
        self.where = where
        self.problem = problem


_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def resolve(name: str | Path) -> tuple[Path, str | None] | None:
    """``(path, split)`` of an existing file or folder, or of ``folder:split``; None when neither exists."""
    p = Path(name)
    if p.exists():
        return p, None
    head, sep, split = str(name).rpartition(":")
    if sep and head and split and Path(head).exists():
        return Path(head), split
    return None


def display_name(path: Path, split: str | None) -> str:
    """How messages name the container: the path, with ``:split`` for a split of a ``DatasetDict``."""
    return f"{path}:{split}" if split is not None else str(path)


def file_format(path: Path) -> str:
    """``"datasets"``, ``"parquet"``, ``"json"`` or ``"jsonl"``."""
    if path.is_dir():
        return "datasets"
    with path.open("rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    return "json" if path.name.removesuffix(".gz").endswith(".json") else "jsonl"


def iter_rows(path: Path, split: str | None = None) -> Iterator[Row]:
    """Every row of the container at ``path`` (see the module docstring); raises :class:`FileProblem`."""
    fmt = file_format(path)
    if split is not None and fmt != "datasets":
        raise FileProblem(None, f"':{split}' chooses a split of a datasets folder; {path} is a file")
    if fmt == "datasets":
        yield from _dataset_rows(path, split)
    elif fmt == "parquet":
        yield from _parquet_rows(path)
    elif fmt == "json":
        yield from _json_rows(path)
    else:
        yield from _jsonl_rows(path)


# ----------------------------------------------------------------------------------------------- JSON text


def _value(text: str) -> Any:
    """A JSON line's value, or a :class:`RowProblem` when it is malformed or holds a lone surrogate."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return RowProblem(None, f"malformed JSON ({e.msg} at column {e.colno})")
    return _check_text(obj, text)


def _check_text(obj: Any, raw: str) -> Any:
    # Only a \ud800-\udfff escape can decode to a lone surrogate (raw UTF-8 cannot hold one): skip the walk
    # for the usual row without one.
    if _SURROGATE_ESCAPE.search(raw) is None:
        return obj
    bad = _surrogate_path(obj, "")
    if bad is None:
        return obj
    return RowProblem(
        bad or None,
        "holds a lone surrogate (a '\\ud800'-'\\udfff' escape without its pair): not valid Unicode text; "
        "fix or remove it",
    )


def _surrogate_path(obj: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(obj, str):
        return path if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if _SURROGATE.search(str(k)):
                return sub
            found = _surrogate_path(v, sub)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _surrogate_path(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _decode(raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem(
            str(lineno),
            f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); save it as UTF-8",
        ) from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    lineno = 0
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, lineno)
                if line.strip():
                    yield str(lineno), lineno, _value(line)
    except (OSError, EOFError) as e:
        raise FileProblem(str(lineno + 1), f"cannot read the file ({e})") from e


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise FileProblem("1", f"cannot read the file ({e})") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise FileProblem(
            str(lineno), f"not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8"
        ) from None
    start = _WS.match(text).end()
    try:
        if text.startswith("[", start):
            rows, end = _array(text, start)
            _end(text, end)
            yield from rows
            return
        if text.startswith("{", start):
            rows = _wrapped(text, start)
            if rows is not None:
                yield from rows
                return
    except json.JSONDecodeError as e:
        first = text[start:].split("\n", 1)[0]
        if not first.startswith("{") or isinstance(_value(first), RowProblem):
            raise FileProblem(str(e.lineno), f"malformed JSON ({e.msg} at column {e.colno})") from None
    yield from _jsonl_rows(path)  # a .json file of JSON lines (or of one object)


def _array(text: str, pos: int) -> tuple[list[Row], int]:
    """The elements of the JSON array at ``text[pos]``, each with the line it starts on; and where it ends."""
    rows: list[Row] = []
    pos = _WS.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    if text.startswith("]", pos):
        return rows, pos + 1
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        obj, end = _DECODER.raw_decode(text, pos)
        rows.append((str(line), line, _check_text(obj, text[pos:end])))
        pos = _WS.match(text, end).end()
        if text.startswith("]", pos):
            return rows, pos + 1
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _WS.match(text, pos + 1).end()


def _end(text: str, pos: int) -> None:
    pos = _WS.match(text, pos).end()
    if pos < len(text):
        raise json.JSONDecodeError("Extra data", text, pos)


def _wrapped(text: str, pos: int) -> list[Row] | None:
    """The elements of ``{"data": [...], ...}`` when the text is that one object, else None."""
    rows: list[Row] | None = None
    pos = _WS.match(text, pos + 1).end()
    while not text.startswith("}", pos):
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _WS.match(text, pos + 1).end()
        if key == "data" and text.startswith("[", pos):
            rows, pos = _array(text, pos)
        else:
            _, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("}", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    if _WS.match(text, pos + 1).end() < len(text):
        return None  # more values follow: JSON lines
    return rows


# ----------------------------------------------------------------------------------------------- Arrow


def _import(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FileProblem(
            None, f"reading {what} needs the {module.split('.')[0]} package: pip install 'dmoerm[data]'"
        ) from None


def _without_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def _parquet_rows(path: Path) -> Iterator[Row]:
    pq = _import("pyarrow.parquet", "Parquet files")
    i = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {i}", i, _without_nulls(row)
                i += 1
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise FileProblem(f"row {i}", f"cannot read the Parquet file ({e})") from e


def _dataset_rows(folder: Path, split: str | None) -> Iterator[Row]:
    if not (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file():
        raise FileProblem(
            None,
            "a folder, but not one datasets' save_to_disk wrote (no dataset_dict.json or state.json in it)",
        )
    datasets = _import("datasets", "a datasets folder")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise FileProblem(None, f"cannot read the datasets folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in ds:
            raise FileProblem(
                None,
                f"no split {name!r}; its splits: {', '.join(ds)} (choose one as {folder}:<split>)",
            )
        ds = ds[name]
    elif split is not None:
        raise FileProblem(None, f"':{split}' chooses a split, but {folder} holds one Dataset without splits")
    for i, row in enumerate(ds):
        yield f"row {i}", i, _without_nulls(row)

"""Preference data: one record type for every source, loaders, and prompt-disjoint splits.

A :class:`PreferenceRecord` holds a whole conversation (multi-turn kept, unlike the authors' code which drops
the context), two or more candidate responses for the next assistant turn, and their ranking. Chosen/rejected
is the two-response case; equal ranks are ties.

Entry points:

* :func:`load_source` reads one of the bundled public sets (names in :data:`SOURCES`) from the data folder
  (:func:`default_data_dir`);
* :func:`load_jsonl` / :func:`save_jsonl` read and write users' own files in the documented JSONL schema
  (``docs/data.md``);
* :func:`split_by_prompt` makes deterministic, prompt-disjoint splits.

Bad input raises :class:`DataError` naming the file, the line and the field; with ``skip_bad=True`` bad lines
are skipped, logged and counted in the :class:`LoadReport` attached to the returned :class:`RecordList`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

DATA_DIR_ENV = "DMOERM_DATA_DIR"
"""Environment variable naming the data folder (the one holding ``rmb/``, ``autoj_scenarios/``, ...)."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """One of ``system``, ``user``, ``assistant``."""
    content: str
    """The turn's text."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: unknown role {self.role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"content: expected a string, got {type(self.content).__name__}")

    def to_json(self) -> dict:
        """``{"role": ..., "content": ...}``."""
        return {"role": self.role, "content": self.content}


def _prompt_key(conversation: tuple[Message, ...]) -> str:
    text = "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in conversation)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PreferenceRecord:
    """A conversation, two or more responses to its next assistant turn, and their human ranking."""

    conversation: tuple[Message, ...]
    """The context, oldest turn first; it ends with a user turn."""
    responses: tuple[str, ...]
    """Two or more candidate assistant responses."""
    ranks: tuple[int, ...]
    """One rank per response, 0 is best; equal ranks are ties."""
    category: str | None = None
    """Task category (a taxonomy category name or a source label still to be mapped), if known."""
    source: str = ""
    """Where the record comes from, e.g. ``rmb/pairwise_helpfulness``."""
    uid: str = ""
    """An identifier unique within the source."""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    """Free-form source fields kept for analysis (e.g. RMB ``category_path``)."""

    def __post_init__(self) -> None:
        if not self.conversation:
            raise ValueError("conversation: empty; a record needs at least one user turn")
        if self.conversation[-1].role != "user":
            raise ValueError("conversation: the last turn must be a user turn (the responses answer it)")
        if len(self.responses) < 2:
            raise ValueError(f"responses: need at least two, got {len(self.responses)}")
        for i, r in enumerate(self.responses):
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"responses[{i}]: empty response")
        if len(self.ranks) != len(self.responses):
            raise ValueError(f"ranks: {len(self.ranks)} ranks for {len(self.responses)} responses")

    @classmethod
    def from_pair(
        cls,
        conversation: list[Message] | tuple[Message, ...],
        chosen: str,
        rejected: str,
        *,
        tie: bool = False,
        category: str | None = None,
        source: str = "",
        uid: str = "",
        meta: dict | None = None,
    ) -> PreferenceRecord:
        """The two-response case: ``chosen`` is better than ``rejected`` (or as good, when ``tie``)."""
        return cls(
            conversation=tuple(conversation),
            responses=(chosen, rejected),
            ranks=(0, 0) if tie else (0, 1),
            category=category,
            source=source,
            uid=uid,
            meta=dict(meta or {}),
        )

    @property
    def prompt_key(self) -> str:
        """A stable hash of the conversation; splits keep every prompt in one split."""
        return _prompt_key(self.conversation)

    def pairs(self) -> list[tuple[int, int]]:
        """Every untied (better, worse) pair of response indices, as the paper's ranking loss uses."""
        n = len(self.responses)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]

    @property
    def chosen(self) -> str:
        """The best response."""
        return self.responses[min(range(len(self.ranks)), key=self.ranks.__getitem__)]

    @property
    def rejected(self) -> str:
        """The worst response."""
        return self.responses[max(range(len(self.ranks)), key=self.ranks.__getitem__)]

    @property
    def is_tie(self) -> bool:
        """True when every response has the same rank (no untied pair)."""
        return len(set(self.ranks)) == 1

    def to_json(self) -> dict:
        """The record in the user JSONL schema (``docs/data.md``); :func:`load_jsonl` reads it back.

        Two responses ranked ``(0, 1)`` or ``(0, 0)`` are written as ``chosen``/``rejected`` (``tie`` when
        tied); anything else as ``responses``/``ranks``.
        """
        obj: dict[str, Any] = {"conversation": [m.to_json() for m in self.conversation]}
        if len(self.responses) == 2 and self.ranks in ((0, 1), (0, 0)):
            obj["chosen"], obj["rejected"] = self.responses
            if self.ranks == (0, 0):
                obj["tie"] = True
        else:
            obj["responses"] = list(self.responses)
            obj["ranks"] = list(self.ranks)
        _common_json(obj, self)
        return obj


@dataclass(frozen=True)
class PromptRecord:
    """A prompt with no responses: router training data and prompt pools for sampling."""

    conversation: tuple[Message, ...]
    category: str | None = None
    source: str = ""
    uid: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.conversation or self.conversation[-1].role != "user":
            raise ValueError("conversation: must end with a user turn")

    @property
    def prompt_key(self) -> str:
        """A stable hash of the conversation, the same as a :class:`PreferenceRecord` on the same prompt."""
        return _prompt_key(self.conversation)

    def to_json(self) -> dict:
        """The record in the user JSONL schema, prompt form (``load_jsonl(..., kind="prompt")`` reads it)."""
        obj: dict[str, Any] = {"conversation": [m.to_json() for m in self.conversation]}
        _common_json(obj, self)
        return obj


Record = PreferenceRecord | PromptRecord


def _common_json(obj: dict, rec: PreferenceRecord | PromptRecord) -> None:
    if rec.category is not None:
        obj["category"] = rec.category
    if rec.source:
        obj["source"] = rec.source
    if rec.uid:
        obj["uid"] = rec.uid
    if rec.meta:
        obj["meta"] = rec.meta


# --------------------------------------------------------------------------------------------------------------
# Load reports


@dataclass
class LoadReport:
    """What a load did: how many records it returned, skipped (bad input) or dropped (known source defects)."""

    source: str
    """The source name or the file loaded."""
    loaded: int = 0
    """Records returned."""
    skipped: int = 0
    """Bad lines skipped because ``skip_bad=True`` (each would otherwise have raised :class:`DataError`)."""
    dropped: int = 0
    """Lines of a bundled source dropped by a documented rule for upstream defects (``docs/data.md``): an
    empty model output, or two responses with the same text ranked differently. Always logged."""
    coerced: int = 0
    """Fields of a bundled source converted by a documented rule (PandaLM's JSON booleans to text)."""
    skipped_lines: list[str] = field(default_factory=list)
    """One ``file:line: field 'x': problem`` message per skipped line."""
    dropped_lines: list[str] = field(default_factory=list)
    """One ``file:line: field 'x': problem`` message per dropped line."""

    def merge(self, other: LoadReport) -> None:
        """Add another report's counts and messages to this one."""
        self.loaded += other.loaded
        self.skipped += other.skipped
        self.dropped += other.dropped
        self.coerced += other.coerced
        self.skipped_lines.extend(other.skipped_lines)
        self.dropped_lines.extend(other.dropped_lines)


class RecordList(list):
    """A list of records with the :class:`LoadReport` of the load that produced it (``.report``)."""

    report: LoadReport

    def __init__(self, records: Iterable = (), report: LoadReport | None = None) -> None:
        super().__init__(records)
        self.report = report if report is not None else LoadReport(source="")


LINE = "<line>"
"""The pseudo-field of a problem with the whole line (malformed JSON, not an object)."""


class _FieldError(Exception):
    """A problem with one field of one line; the reader adds the file and line."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(problem if field_name == LINE else f"field '{field_name}': {problem}")
        self.field_name = field_name
        self.problem = problem


class _Defect(_FieldError):
    """A known upstream defect of a bundled source: the line is dropped (logged and counted), never raised."""


# --------------------------------------------------------------------------------------------------------------
# Field helpers

_MISSING = object()


def _get(obj: Any, path: str) -> Any:
    """The value at a dotted path (``chosen.answer``, ``conversation_input[2].role``) or raise ``missing``."""
    cur = obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            idx = int(part[1:-1])
            if not isinstance(cur, list) or idx >= len(cur):
                raise _FieldError(path, "missing")
            cur = cur[idx]
        else:
            if not isinstance(cur, dict):
                raise _FieldError(path, f"expected an object, got {_typename(cur)}")
            cur = cur.get(part, _MISSING)
            if cur is _MISSING:
                raise _FieldError(path, "missing")
    return cur


def _typename(v: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _str(obj: Any, path: str, *, optional: bool = False) -> str | None:
    try:
        v = _get(obj, path)
    except _FieldError:
        if optional:
            return None
        raise
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _FieldError(path, f"expected a string, got {_typename(v)}")
    return v


def _response(obj: Any, path: str, *, bundled: bool) -> str:
    """A response text: a non-empty string. In a bundled source an empty one is a known defect (dropped)."""
    v = _str(obj, path)
    assert v is not None
    if not v.strip():
        raise (_Defect if bundled else _FieldError)(path, "empty response")
    return v


def _check_distinct(
    texts: Sequence[str], ranks: Sequence[int], paths: Sequence[str], *, bundled: bool
) -> None:
    """Two responses with the same text but different ranks contradict each other."""
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        key = t.strip()
        j = seen.get(key)
        if j is not None and ranks[i] != ranks[j]:
            raise (_Defect if bundled else _FieldError)(
                paths[i], f"same text as '{paths[j]}' but ranked differently"
            )
        seen.setdefault(key, i)


def _message(
    turn: dict, path: str, role_key: str, content_key: str, role_map: Mapping[str, str] | None
) -> Message:
    for key in (role_key, content_key):
        if key not in turn:
            raise _FieldError(f"{path}.{key}", "missing")
    role, content = turn[role_key], turn[content_key]
    if not isinstance(role, str):
        raise _FieldError(f"{path}.{role_key}", f"expected a string, got {_typename(role)}")
    mapped = role_map.get(role) if role_map is not None else role
    if mapped not in ROLES:
        allowed = ", ".join(role_map if role_map is not None else ROLES)
        raise _FieldError(f"{path}.{role_key}", f"unknown role {role!r}; use one of {allowed}")
    if not isinstance(content, str):
        raise _FieldError(f"{path}.{content_key}", f"expected a string, got {_typename(content)}")
    return Message(mapped, content)


def _conversation(
    obj: Any,
    path: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    role_map: Mapping[str, str] | None = None,
) -> list[Message]:
    out = _turns(obj, path, role_key=role_key, content_key=content_key, role_map=role_map)
    if not out:
        raise _FieldError(path, "empty; a record needs at least one user turn")
    if out[-1].role != "user":
        raise _FieldError(path, f"the last turn must be a user turn, got {out[-1].role!r}")
    if not any(m.content.strip() for m in out):
        raise _FieldError(path, "every turn is empty")
    return out


def _turns(
    obj: Any,
    path: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    role_map: Mapping[str, str] | None = None,
) -> list[Message]:
    """A list of turns (possibly empty), each checked and named ``path[i].role`` etc. when bad."""
    turns = _get(obj, path)
    if not isinstance(turns, list):
        raise _FieldError(path, f"expected a list of turns, got {_typename(turns)}")
    out = []
    for i, t in enumerate(turns):
        p = f"{path}[{i}]"
        if not isinstance(t, dict):
            raise _FieldError(p, f"expected an object, got {_typename(t)}")
        out.append(_message(t, p, role_key, content_key, role_map))
    return out


def _user(text: str) -> list[Message]:
    return [Message("user", text)]


def _join(instruction: str, inp: str | None) -> str:
    """Instruction and optional input, separated by a blank line (the input omitted when empty)."""
    instruction = instruction.strip()
    inp = (inp or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


# --------------------------------------------------------------------------------------------------------------
# The reader: one JSON object per line, gzip or plain


Parser = Callable[[dict, int], list]
"""``parse(obj, position)``: the records of one row; ``position`` is its line number (row index for Parquet and
``datasets``), the default ``uid``."""


def _read(
    path: Path,
    display: str,
    parse: Parser,
    *,
    skip_bad: bool,
    limit: int | None,
    report: LoadReport,
    split: str | None = None,
) -> list:
    """Parse every row of ``path`` (:func:`dmoerm.data_files.iter_rows`) with ``parse(obj, position)``;
    errors name ``display:line`` (``display:row i`` for Parquet and ``datasets``)."""
    from dmoerm.data_files import FileProblem, RowProblem, iter_rows

    records: list = []
    try:
        for where, position, obj in iter_rows(path, split):
            if limit is not None and len(records) >= limit:
                break
            try:
                if isinstance(obj, RowProblem):
                    raise _FieldError(obj.field or LINE, obj.problem)
                if not isinstance(obj, dict):
                    raise _FieldError(LINE, f"expected a JSON object, got {_typename(obj)}")
                records.extend(parse(obj, position))
            except _Defect as e:
                report.dropped += 1
                report.dropped_lines.append(f"{display}:{where}: {e}")
            except _FieldError as e:
                msg = f"{display}:{where}: {e}"
                if not skip_bad:
                    raise DataError(msg) from None
                report.skipped += 1
                report.skipped_lines.append(msg)
    except FileProblem as e:
        where = f":{e.where}" if e.where is not None else ""
        raise DataError(f"{display}{where}: {e.problem}") from None
    if limit is not None:
        del records[limit:]
    return records


def _log_report(report: LoadReport) -> None:
    if report.skipped:
        logger.warning(
            "%s: skipped %d bad record(s) (skip_bad=True); first: %s",
            report.source,
            report.skipped,
            report.skipped_lines[0],
        )
    if report.dropped:
        logger.warning(
            "%s: dropped %d record(s) with known upstream defects (empty or duplicate responses); first: %s",
            report.source,
            report.dropped,
            report.dropped_lines[0],
        )
    logger.info("%s: loaded %d record(s)", report.source, report.loaded)


# --------------------------------------------------------------------------------------------------------------
# The user JSONL schema

_USER_KEYS = {"conversation", "prompt", "chosen", "rejected", "tie", "responses", "ranks"}
_COMMON_KEYS = {"category", "source", "uid", "meta"}


def _user_conversation(obj: dict, *, required: bool = True) -> list[Message] | None:
    """``conversation``, or ``prompt``: a string (one user turn) or a TRL conversational prompt (turns)."""
    has_conv, has_prompt = "conversation" in obj, "prompt" in obj
    if has_conv and has_prompt:
        raise _FieldError("prompt", "give either 'conversation' or 'prompt', not both")
    if has_prompt:
        if isinstance(obj["prompt"], list):
            return _conversation(obj, "prompt")
        text = _str(obj, "prompt")
        assert text is not None
        if not text.strip():
            raise _FieldError("prompt", "empty")
        return _user(text)
    if has_conv:
        return _conversation(obj, "conversation")
    if required:
        raise _FieldError("conversation", "missing (or give 'prompt' for a one-turn conversation)")
    return None


def _user_common(obj: dict, default_source: str, lineno: int) -> dict:
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise _FieldError("category", f"expected a string or null, got {_typename(category)}")
    source = obj.get("source", default_source)
    if not isinstance(source, str):
        raise _FieldError("source", f"expected a string, got {_typename(source)}")
    uid = obj.get("uid")
    if uid is None:
        uid = str(lineno)
    elif isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise _FieldError("uid", f"expected a string, got {_typename(uid)}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _FieldError("meta", f"expected an object, got {_typename(meta)}")
    meta = dict(meta)
    extra = {k: v for k, v in obj.items() if k not in _USER_KEYS | _COMMON_KEYS}
    meta.update(extra)
    return {"category": category, "source": source, "uid": str(uid), "meta": meta}


def _user_preference(obj: dict, lineno: int, default_source: str) -> list[PreferenceRecord]:
    conv = _user_conversation(obj, required=False)
    common = _user_common(obj, default_source, lineno)
    if "responses" in obj or "ranks" in obj:
        if conv is None:
            raise _FieldError("conversation", "missing (or give 'prompt' for a one-turn conversation)")
        if "chosen" in obj or "rejected" in obj:
            raise _FieldError("responses", "give either 'chosen'/'rejected' or 'responses'/'ranks', not both")
        responses = _get(obj, "responses")
        if not isinstance(responses, list):
            raise _FieldError("responses", f"expected a list of strings, got {_typename(responses)}")
        if len(responses) < 2:
            raise _FieldError("responses", f"need at least two, got {len(responses)}")
        texts = [_user_response(obj, f"responses[{i}]") for i in range(len(responses))]
        ranks = _get(obj, "ranks")
        if not isinstance(ranks, list):
            raise _FieldError("ranks", f"expected a list of integers, got {_typename(ranks)}")
        if len(ranks) != len(texts):
            raise _FieldError("ranks", f"{len(ranks)} ranks for {len(texts)} responses")
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise _FieldError(f"ranks[{i}]", f"expected an integer >= 0 (0 is best), got {r!r}")
        _check_distinct(texts, ranks, [f"responses[{i}]" for i in range(len(texts))], bundled=False)
        return [PreferenceRecord(tuple(conv), tuple(texts), tuple(ranks), **common)]
    if "chosen" not in obj:
        raise _FieldError("chosen", "missing (or give 'responses' and 'ranks')")
    if "rejected" not in obj:
        raise _FieldError("rejected", "missing")
    tie = obj.get("tie", False)
    if not isinstance(tie, bool):
        raise _FieldError("tie", f"expected true or false, got {_typename(tie)}")
    if isinstance(obj["chosen"], list) or isinstance(obj["rejected"], list):
        conv, chosen, rejected = _trl_conversational(obj, conv)
    elif conv is None:
        conv, chosen, rejected = _implicit_strings(obj)
    else:
        chosen = _response(obj, "chosen", bundled=False)
        rejected = _response(obj, "rejected", bundled=False)
    _check_distinct([chosen, rejected], [0, 0 if tie else 1], ["chosen", "rejected"], bundled=False)
    return [PreferenceRecord.from_pair(conv, chosen, rejected, tie=tie, **common)]


def _user_response(obj: dict, path: str) -> str:
    """A response: a string, or (TRL conversational) a list holding one assistant turn."""
    if isinstance(_get(obj, path), list):
        turns = _turns(obj, path)
        _one_assistant_turn(turns, path, 0)
        if not turns[0].content.strip():
            raise _FieldError(f"{path}[0].content", "empty response")
        return turns[0].content
    return _response(obj, path, bundled=False)


def _one_assistant_turn(turns: list[Message], path: str, offset: int) -> None:
    if len(turns) != 1 or turns[0].role != "assistant":
        got = ", ".join(m.role for m in turns) or "none"
        where = f" after the {offset} turn(s) 'chosen' and 'rejected' share" if offset else ""
        raise _FieldError(path, f"expected one assistant turn{where}, got {len(turns)} ({got})")


def _trl_conversational(obj: dict, conv: list[Message] | None) -> tuple[list[Message], str, str]:
    """TRL's conversational preference rows: ``chosen``/``rejected`` lists of turns, with an explicit
    ``prompt`` (each side one assistant turn) or an implicit one (both sides whole conversations: the prompt is
    the turns they share, as ``trl.extract_prompt`` takes it; an explicit prompt given too must equal it)."""
    for name in ("chosen", "rejected"):
        if not isinstance(obj[name], list):
            other = "rejected" if name == "chosen" else "chosen"
            raise _FieldError(name, f"expected a list of turns like '{other}', got {_typename(obj[name])}")
    sides = {name: _turns(obj, name) for name in ("chosen", "rejected")}
    shared = 0
    for a, b in zip(sides["chosen"], sides["rejected"]):
        if a != b:
            break
        shared += 1
    for name, other in (("rejected", "chosen"), ("chosen", "rejected")):
        if shared and shared == len(sides[name]):
            problem = (
                "the same turns as"
                if shared == len(sides[other])
                else "no response after the turns it shares with"
            )
            raise _FieldError(name, f"{problem} '{other}'")
    if shared:
        prefix = sides["chosen"][:shared]
        if conv is not None and conv != prefix:
            field_name = "prompt" if "prompt" in obj else "conversation"
            raise _FieldError(field_name, "differs from the turns 'chosen' and 'rejected' start with")
        if prefix[-1].role != "user":
            raise _FieldError(
                "chosen", f"the turns shared with 'rejected' end with {prefix[-1].role!r}, not user"
            )
        conv = prefix
    elif conv is None:
        raise _FieldError(
            "prompt",
            "missing, and 'chosen' and 'rejected' share no turn (an implicit prompt is the turns they share)",
        )
    texts = []
    for name, turns in sides.items():
        rest = turns[shared:]
        _one_assistant_turn(rest, name, shared)
        if not rest[0].content.strip():
            raise _FieldError(f"{name}[{shared}].content", "empty response")
        texts.append(rest[0].content)
    return conv, texts[0], texts[1]


def _implicit_strings(obj: dict) -> tuple[list[Message], str, str]:
    """``chosen``/``rejected`` strings without a prompt: read as Anthropic HH dialogues
    (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), the implicit-prompt form a chat reward model can use."""
    chosen, rejected = _str(obj, "chosen"), _str(obj, "rejected")
    assert chosen is not None and rejected is not None
    if not chosen.startswith("\n\nHuman:"):
        raise _FieldError(
            "conversation",
            "missing (or give 'prompt' for a one-turn conversation; 'chosen'/'rejected' strings without a prompt "
            "are read only as Anthropic HH dialogues starting '\\n\\nHuman:')",
        )
    return _hh_split(chosen, rejected, bundled=False)


def _user_prompt(obj: dict, lineno: int, default_source: str) -> list[PromptRecord]:
    conv = _user_conversation(obj)
    common = _user_common(obj, default_source, lineno)
    return [PromptRecord(tuple(conv), **common)]


def load_file(
    path: str | Path,
    skip_bad: bool = False,
    *,
    kind: str = "preference",
    limit: int | None = None,
) -> RecordList:
    """Read a user's file in the schema of ``docs/data.md``: JSON lines (plain or ``.gz``), JSON (a list of
    objects or ``{"data": [...]}``), Parquet, or a ``datasets.save_to_disk`` folder (``folder:split`` chooses
    a split of a ``DatasetDict``, default ``train``); rows in dmoerm's own schema or TRL's preference formats.

    ``kind="preference"`` (default) reads :class:`PreferenceRecord` rows (``chosen``/``rejected`` or
    ``responses``/``ranks``); ``kind="prompt"`` reads :class:`PromptRecord` rows (``conversation`` or
    ``prompt``, response fields ignored). A bad row raises :class:`DataError` naming the file, the line (or
    ``row i``) and the field, unless ``skip_bad``: then it is skipped, logged and counted in ``.report.skipped``.
    """
    from dmoerm.data_files import display_name, resolve

    if kind not in ("preference", "prompt"):
        raise ValueError(f"kind: {kind!r}; use 'preference' or 'prompt'")
    _check_limit(limit)
    found = resolve(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no such file or folder")
    p, split = found
    default_source = p.name.removesuffix(".gz")
    for suffix in (".jsonl", ".json", ".parquet"):
        default_source = default_source.removesuffix(suffix)
    fn = _user_preference if kind == "preference" else _user_prompt
    display = display_name(p, split)
    report = LoadReport(source=display)
    records = _read(
        p,
        display,
        lambda obj, n: fn(obj, n, default_source),
        skip_bad=skip_bad,
        limit=limit,
        report=report,
        split=split,
    )
    report.loaded = len(records)
    _log_report(report)
    return RecordList(records, report)


load_jsonl = load_file
"""The former name of :func:`load_file` (it reads every format, not only JSON lines)."""


def save_jsonl(records: Iterable[PreferenceRecord | PromptRecord], path: str | Path) -> int:
    """Write records in the user JSONL schema (gzip when ``path`` ends with ``.gz``); return the count.

    ``meta`` must be JSON-serialisable; the parent folder is created.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "wt", encoding="utf-8") as f:
        for rec in records:
            if not isinstance(rec, (PreferenceRecord, PromptRecord)):
                raise TypeError(f"records[{n}]: expected a PreferenceRecord or PromptRecord, got {type(rec)}")
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------------------------
# Bundled sources


def _rmb_meta(obj: dict, models: list[Any]) -> dict:
    return {"category_path": obj.get("category_path"), "models": models}


def _rmb_pairwise(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(obj, "conversation_input")
        chosen = _response(obj, "chosen.answer", bundled=True)
        rejected = _response(obj, "reject.answer", bundled=True)
        _check_distinct([chosen, rejected], [0, 1], ["chosen.answer", "reject.answer"], bundled=True)
        subset = _str(obj, "subset")
        uid = _get(obj, "pair_uid")
        models = [obj["chosen"].get("llm_name"), obj["reject"].get("llm_name")]
        return [
            PreferenceRecord.from_pair(
                conv,
                chosen,
                rejected,
                category=subset,
                source=source,
                uid=str(uid),
                meta=_rmb_meta(obj, models),
            )
        ]

    return parse


def _rmb_bon(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(obj, "conversation_input")
        best = _response(obj, "bon_best.answer", bundled=True)
        losers = _get(obj, "loser_list")
        if not isinstance(losers, list) or not losers:
            raise _FieldError("loser_list", "expected a non-empty list")
        texts = [best] + [_response(obj, f"loser_list[{i}].answer", bundled=True) for i in range(len(losers))]
        ranks = [0] + [1] * len(losers)
        paths = ["bon_best.answer"] + [f"loser_list[{i}].answer" for i in range(len(losers))]
        _check_distinct(texts, ranks, paths, bundled=True)
        subset = _str(obj, "subset")
        models = [obj["bon_best"].get("llm_name")] + [
            (x.get("llm_name") if isinstance(x, dict) else None) for x in losers
        ]
        return [
            PreferenceRecord(
                tuple(conv),
                tuple(texts),
                tuple(ranks),
                category=subset,
                source=source,
                uid=str(_get(obj, "bon_uid")),
                meta=_rmb_meta(obj, models),
            )
        ]

    return parse


def _autoj(source: str, split: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PromptRecord]:
        instruction = _str(obj, "instruction")
        assert instruction is not None
        if not instruction.strip():
            raise _FieldError("instruction", "empty")
        inp = _str(obj, "input", optional=True)
        label = _str(obj, "category")
        return [
            PromptRecord(
                tuple(_user(_join(instruction, inp))),
                category=label,
                source=source,
                uid=f"{split}-{lineno}",
                meta={"split": split},
            )
        ]

    return parse


def _pandalm_response(obj: dict, path: str, report: LoadReport) -> tuple[str, bool]:
    v = _get(obj, path)
    if isinstance(v, bool):
        # The upstream JSON holds a few bare booleans where the model answered "True"/"False".
        report.coerced += 1
        return ("True" if v else "False"), True
    return _response(obj, path, bundled=True), False


def _pandalm(source: str, report: LoadReport) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        instruction = _str(obj, "instruction")
        assert instruction is not None
        prompt = _join(instruction, _str(obj, "input", optional=True))
        r1, c1 = _pandalm_response(obj, "response1", report)
        r2, c2 = _pandalm_response(obj, "response2", report)
        votes = []
        for k in ("annotator1", "annotator2", "annotator3"):
            v = _get(obj, k)
            if isinstance(v, bool) or v not in (0, 1, 2):
                raise _FieldError(k, f"expected 0 (tie), 1 or 2, got {v!r}")
            votes.append(v)
        counts = {v: votes.count(v) for v in set(votes)}
        top, n = max(counts.items(), key=lambda kv: kv[1])
        winner = top if n >= 2 else 0  # no majority (0, 1, 2) -> tie
        tie = winner == 0
        chosen, rejected = (r2, r1) if winner == 2 else (r1, r2)
        _check_distinct([chosen, rejected], [0, 0 if tie else 1], ["response1", "response2"], bundled=True)
        meta = {
            "votes": votes,
            "winner": winner,
            "motivation_app": obj.get("motivation_app"),
            "cmp_key": obj.get("cmp_key"),
        }
        if c1 or c2:
            meta["coerced_bool"] = [i for i, c in ((1, c1), (2, c2)) if c]
        return [
            PreferenceRecord.from_pair(
                _user(prompt),
                chosen,
                rejected,
                tie=tie,
                source=source,
                uid=str(obj.get("idx", lineno)),
                meta=meta,
            )
        ]

    return parse


def _llmbar(source: str, subset: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        prompt = _str(obj, "input")
        assert prompt is not None
        if not prompt.strip():
            raise _FieldError("input", "empty")
        o1 = _response(obj, "output_1", bundled=True)
        o2 = _response(obj, "output_2", bundled=True)
        label = _get(obj, "label")
        if isinstance(label, bool) or label not in (1, 2):
            raise _FieldError("label", f"expected 1 or 2, got {label!r}")
        chosen, rejected = (o1, o2) if label == 1 else (o2, o1)
        _check_distinct([chosen, rejected], [0, 1], ["output_1", "output_2"], bundled=True)
        return [
            PreferenceRecord.from_pair(
                _user(prompt),
                chosen,
                rejected,
                source=source,
                uid=f"{subset}-{lineno}",
                meta={"subset": subset, "label": label},
            )
        ]

    return parse


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_turns(text: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _FieldError("chosen", "text before the first '\\n\\nHuman:' turn")
    out: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if out and out[-1].role == role:  # a turn that itself contained a speaker marker: merge
            out[-1] = Message(role, f"{out[-1].content}\n\n{content}")
        else:
            out.append(Message(role, content))
    return out


def _hh_split(chosen_text: str, rejected_text: str, *, bundled: bool) -> tuple[list[Message], str, str]:
    """The shared context and each side's last assistant turn of two HH dialogues (``docs/data.md``)."""
    common = os.path.commonprefix([chosen_text, rejected_text])
    k = common.rfind(_HH_ASSISTANT)
    if k < 0:
        raise _FieldError("rejected", "its context differs from 'chosen' (no shared '\\n\\nAssistant:' turn)")
    if chosen_text.rfind(_HH_ASSISTANT) != k and rejected_text.rfind(_HH_ASSISTANT) != k:
        raise _FieldError("rejected", "its context differs from 'chosen' before the last assistant turn")
    context = _hh_turns(chosen_text[:k])
    if not context or context[-1].role != "user":
        raise _FieldError("chosen", "the context before the last assistant turn does not end with Human")
    start = k + len(_HH_ASSISTANT)
    resp = {"chosen": chosen_text[start:].strip(), "rejected": rejected_text[start:].strip()}
    for name, text in resp.items():
        if not text:
            raise (_Defect if bundled else _FieldError)(name, "empty response")
    return context, resp["chosen"], resp["rejected"]


def _hh(source: str, label: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        chosen_text = _str(obj, "chosen")
        rejected_text = _str(obj, "rejected")
        assert chosen_text is not None and rejected_text is not None
        context, chosen, rejected = _hh_split(chosen_text, rejected_text, bundled=True)
        _check_distinct([chosen, rejected], [0, 1], ["chosen", "rejected"], bundled=True)
        return [
            PreferenceRecord.from_pair(
                context, chosen, rejected, category=label, source=source, uid=str(lineno)
            )
        ]

    return parse


_FG_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
"""FineGrainedRLHF's ``preference`` order: 1vs2, 1vs3, 1vs4, 2vs3, 2vs4, 3vs4 (0-based prediction indices)."""


def _fg_prompt(question: str, passages: list) -> str:
    blocks = []
    for i, p in enumerate(passages, 1):
        if not isinstance(p, list) or not p or not all(isinstance(s, str) for s in p):
            raise _FieldError(f"passages[{i - 1}]", "expected a list of strings (title, then sentences)")
        title, sentences = p[0], list(p[1:])
        if sentences and sentences[0].startswith(title + "\n\n"):  # the first sentence repeats the title
            sentences[0] = sentences[0][len(title) + 2 :]
        blocks.append(f"[{i}] {title}\n" + " ".join(s.strip() for s in sentences if s.strip()))
    if not blocks:
        return question.strip()
    # The question goes last: prompts are cut from the left to fit the model (the passages' median is ~700
    # tokens), and the question is what must survive.
    return "Passages:\n" + "\n\n".join(blocks) + "\n\nQuestion: " + question.strip()


def _fg_ranks(prefs: Sequence[int]) -> list[int] | None:
    """Dense ranks (0 best) consistent with all six pairwise preferences, or None when none exists."""
    wins = [0, 0, 0, 0]
    for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
        if v == 1:
            wins[i] += 1
        elif v == 2:
            wins[j] += 1
    levels = sorted(set(wins), reverse=True)
    ranks = [levels.index(w) for w in wins]
    for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
        want = 0 if ranks[i] == ranks[j] else (1 if ranks[i] < ranks[j] else 2)
        if want != v:
            return None
    return ranks


def _finegrained(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        question = _str(obj, "question")
        assert question is not None
        passages = _get(obj, "passages")
        if not isinstance(passages, list):
            raise _FieldError("passages", f"expected a list, got {_typename(passages)}")
        prompt = _fg_prompt(question, passages)
        preds = [_response(obj, f"prediction {k}", bundled=True) for k in range(1, 5)]
        prefs = _get(obj, "preference")
        if not isinstance(prefs, list) or len(prefs) != 6:
            raise _FieldError(
                "preference", "expected a list of 6 values (1vs2, 1vs3, 1vs4, 2vs3, 2vs4, 3vs4)"
            )
        for i, v in enumerate(prefs):
            if isinstance(v, bool) or v not in (0, 1, 2):
                raise _FieldError(f"preference[{i}]", f"expected 0 (no preference), 1 or 2, got {v!r}")
        feedback = _get(obj, "feedback")
        base_meta = {
            "gold": obj.get("gold"),
            "preference": list(prefs),
            "passages": passages,
        }
        ranks = _fg_ranks(prefs)
        conv = _user(prompt)
        if ranks is not None:
            _check_distinct(preds, ranks, [f"prediction {k}" for k in range(1, 5)], bundled=True)
            meta = dict(base_meta, consistent=True, prediction_ids=[1, 2, 3, 4])
            meta["feedback"] = [feedback, None, None, None]
            return [
                PreferenceRecord(
                    tuple(conv),
                    tuple(preds),
                    tuple(ranks),
                    category="long_form_qa",
                    source=source,
                    uid=str(lineno),
                    meta=meta,
                )
            ]
        out = []
        for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
            first, second = (j, i) if v == 2 else (i, j)
            meta = dict(base_meta, consistent=False, prediction_ids=[first + 1, second + 1])
            meta["feedback"] = [feedback if first == 0 else None, feedback if second == 0 else None]
            pair_ranks = [0, 0 if v == 0 else 1]
            _check_distinct(
                [preds[first], preds[second]],
                pair_ranks,
                [f"prediction {first + 1}", f"prediction {second + 1}"],
                bundled=True,
            )
            out.append(
                PreferenceRecord.from_pair(
                    conv,
                    preds[first],
                    preds[second],
                    tie=v == 0,
                    category="long_form_qa",
                    source=source,
                    uid=f"{lineno}-{i + 1}v{j + 1}",
                    meta=meta,
                )
            )
        return out

    return parse


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _zh_pairs(source: str, dataset: str, language: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(
            obj, "conversations", role_key="from", content_key="value", role_map=_SHAREGPT_ROLES
        )
        paths = []
        texts = []
        for name in ("chosen", "rejected"):
            v = _get(obj, name)
            path = f"{name}.value" if isinstance(v, dict) else name
            texts.append(_response(obj, path, bundled=True))
            paths.append(path)
        _check_distinct(texts, [0, 1], paths, bundled=True)
        return [
            PreferenceRecord.from_pair(
                conv,
                texts[0],
                texts[1],
                source=source,
                uid=str(lineno),
                meta={"dataset": dataset, "language": language},
            )
        ]

    return parse


def _arena_hard(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PromptRecord]:
        prompt = _str(obj, "prompt")
        assert prompt is not None
        if not prompt.strip():
            raise _FieldError("prompt", "empty")
        category = _str(obj, "category")
        sub = _str(obj, "subcategory", optional=True)
        cluster = _str(obj, "cluster", optional=True)
        label = f"{category}/{sub}" if sub and sub != category else category
        meta = {"category": category}
        if sub is not None:
            meta["subcategory"] = sub
        if cluster is not None:
            meta["cluster"] = cluster
        return [
            PromptRecord(
                tuple(_user(prompt)),
                category=label,
                source=source,
                uid=str(obj.get("uid", lineno)),
                meta=meta,
            )
        ]

    return parse


def _alignbench(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PromptRecord]:
        question = _str(obj, "question")
        assert question is not None
        if not question.strip():
            raise _FieldError("question", "empty")
        category = _str(obj, "category")
        sub = _str(obj, "subcategory", optional=True)
        return [
            PromptRecord(
                tuple(_user(question)),
                category=f"{category}/{sub}" if sub else category,
                source=source,
                uid=str(obj.get("question_id", lineno)),
                meta={
                    "category": category,
                    "subcategory": sub,
                    "reference": obj.get("reference"),
                    "language": "zh",
                },
            )
        ]

    return parse


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
        lambda s, r: _rmb_pairwise(s),
    ),
    "rmb/pairwise_harmlessness": _Spec(
        "rmb/pairwise_harmlessness.jsonl.gz",
        "preference",
        "RMB pairwise harmlessness: chosen/reject pairs; category = subset ('Harmlessness/S1'..'S11', 'multi')",
        lambda s, r: _rmb_pairwise(s),
    ),
    "rmb/bon_helpfulness": _Spec(
        "rmb/bon_helpfulness.jsonl.gz",
        "preference",
        "RMB best-of-n helpfulness: [bon_best] + losers, ranks (0, 1, 1, ...); category = subset",
        lambda s, r: _rmb_bon(s),
    ),
    "rmb/bon_harmlessness": _Spec(
        "rmb/bon_harmlessness.jsonl.gz",
        "preference",
        "RMB best-of-n harmlessness: [bon_best] + losers, ranks (0, 1, 1, ...); category = subset",
        lambda s, r: _rmb_bon(s),
    ),
    "autoj/train": _Spec(
        "autoj_scenarios/train.jsonl.gz",
        "prompt",
        "Auto-J scenario classifier train prompts; category = one of 58 scenarios (or 'default')",
        lambda s, r: _autoj(s, "train"),
    ),
    "autoj/test": _Spec(
        "autoj_scenarios/test.jsonl.gz",
        "prompt",
        "Auto-J scenario classifier test prompts; category = one of 58 scenarios (or 'default')",
        lambda s, r: _autoj(s, "test"),
    ),
    "pandalm/test": _Spec(
        "pandalm/testset.jsonl.gz",
        "preference",
        "PandaLM test set: pairs judged by 3 annotators, majority vote (no majority or a 0 majority = tie)",
        _pandalm,
    ),
    **{
        f"llmbar/{name}": _Spec(
            f"llmbar/{name}.jsonl.gz",
            "preference",
            f"LLMBar {name.replace('_', ' ')}: instruction-following pairs with a gold label",
            (lambda n: lambda s, r: _llmbar(s, n))(name),
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
        lambda s, r: _hh(s, "harmless-base"),
    ),
    "finegrained_rlhf/qa_dev": _Spec(
        "finegrained_rlhf/qa_dev_feedback.jsonl.gz",
        "preference",
        "FineGrainedRLHF qa-feedback dev: question + passages, 4 answers ranked from 6 pairwise preferences "
        "(pairs when inconsistent); span feedback on answer 1 in meta; category 'long_form_qa'",
        lambda s, r: _finegrained(s),
    ),
    "zh_pairs/llamafactory_en": _Spec(
        "zh_pairs/llamafactory_dpo_en_demo.jsonl.gz",
        "preference",
        "LLaMA-Factory DPO English demo pairs (model-labelled)",
        lambda s, r: _zh_pairs(s, "llamafactory_dpo_en_demo", "en"),
    ),
    "zh_pairs/llamafactory_zh": _Spec(
        "zh_pairs/llamafactory_dpo_zh_demo.jsonl.gz",
        "preference",
        "LLaMA-Factory DPO Chinese demo pairs (model-labelled)",
        lambda s, r: _zh_pairs(s, "llamafactory_dpo_zh_demo", "zh"),
    ),
    "zh_pairs/medicalgpt_zh": _Spec(
        "zh_pairs/medicalgpt_dpo_zh_500.jsonl.gz",
        "preference",
        "MedicalGPT DPO Chinese pairs (model-labelled)",
        lambda s, r: _zh_pairs(s, "medicalgpt_dpo_zh_500", "zh"),
    ),
    "arena_hard/v0.1": _Spec(
        "arena_hard/arena-hard-v0.1_questions.jsonl.gz",
        "prompt",
        "Arena-Hard v0.1 prompts; category 'arena-hard-v0.1' (topic cluster in meta)",
        lambda s, r: _arena_hard(s),
    ),
    "arena_hard/v2.0": _Spec(
        "arena_hard/arena-hard-v2.0_questions.jsonl.gz",
        "prompt",
        "Arena-Hard v2.0 prompts; category '<category>/<subcategory>', e.g. 'hard_prompt/coding'",
        lambda s, r: _arena_hard(s),
    ),
    "alignbench": _Spec(
        "alignbench/prompts.jsonl.gz",
        "prompt",
        "AlignBench Chinese prompts; category '<category>/<subcategory>', reference answer in meta",
        lambda s, r: _alignbench(s),
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


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: {limit!r}; use a positive integer or None")


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
    from dmoerm.data_files import resolve

    if str(name) in SOURCES:
        return load_source(str(name), data_dir, skip_bad=skip_bad, limit=limit)
    if resolve(name) is not None:
        return load_file(name, skip_bad=skip_bad, limit=limit)
    raise FileNotFoundError(
        f"{name}: neither a bundled source ({', '.join(sorted(SOURCE_GROUPS))}, ... see dmoerm.data.SOURCES) "
        "nor an existing file (JSONL, JSON, Parquet) or datasets folder (FOLDER or FOLDER:SPLIT)"
    )


# --------------------------------------------------------------------------------------------------------------
# Splits


def _validate_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(
            "fractions: give a non-empty mapping of split name -> fraction, e.g. {'train': 0.9, 'test': 0.1}"
        )
    items = []
    for name, frac in fractions.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"fractions: split name {name!r} must be a non-empty string")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac):
            raise ValueError(f"fractions[{name!r}]: {frac!r} is not a number")
        if not 0 <= frac <= 1:
            raise ValueError(f"fractions[{name!r}]: {frac} is outside [0, 1]")
        items.append((name, float(frac)))
    total = sum(f for _, f in items)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"fractions: they sum to {total:g}; they must sum to 1 (e.g. {{'train': 0.9, 'test': 0.1}})"
        )
    return items


def split_by_prompt(records: Iterable[Any], fractions: Mapping[str, float], seed: int = 0) -> dict[str, list]:
    """Split records by a hash of ``prompt_key`` and ``seed``: every prompt lands in exactly one split.

    The assignment of a prompt depends only on its conversation, the seed and the fractions, not on the other
    records or the loader, so records on the same prompt from different sources stay together. Returns every
    split name (in the order given, possibly with an empty list), each list in input order.
    """
    items = _validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r}; use an integer")
    bounds = []
    acc = 0.0
    for name, frac in items:
        acc += frac
        bounds.append((name, acc))
    out: dict[str, list] = {name: [] for name, _ in items}
    last = next(name for name, frac in reversed(items) if frac > 0)
    for rec in records:
        h = hashlib.sha256(f"{seed}\x00{rec.prompt_key}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        target = last
        for name, upper in bounds:
            if u < upper:
                target = name
                break
        out[target].append(rec)
    return out


def with_label_noise(
    records: Iterable[PreferenceRecord], share: float, seed: int = 0
) -> list[PreferenceRecord]:
    """Reverse the human ranking of about ``share`` of the records (best becomes worst; ties stay tied).

    The over-optimisation experiments of Gao et al. 2022 and Coste et al. 2023 train proxy reward models on
    labels with a known share flipped (25% in Coste et al.). Whether a record flips depends only on its prompt,
    its responses and ``seed``, so a record keeps its fate across runs and subsets.
    """
    if not 0.0 <= share < 0.5:
        raise ValueError(f"label_noise: {share} must be in [0, 0.5) (0.5 and above would invert the labels)")
    out = []
    for rec in records:
        h = hashlib.sha256(f"{seed}\x00{rec.prompt_key}\x00{rec.responses!r}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2.0**64 < share:
            worst = max(rec.ranks)
            rec = dataclasses.replace(rec, ranks=tuple(worst - r for r in rec.ranks))
        out.append(rec)
    return out

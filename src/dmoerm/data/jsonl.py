"""Users' own files: the JSONL schema of ``docs/data.md`` (``chosen``/``rejected``, ``responses``/``ranks``,
prompt-only rows), TRL's conversational and implicit-prompt preference rows, in any container
:mod:`dmoerm.data.files` reads; and :func:`save_jsonl`, which writes what :func:`load_file` reads back.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from dmoerm.data.fields import (
    _check_distinct,
    _conversation,
    _FieldError,
    _get,
    _hh_split,
    _response,
    _str,
    _turns,
    _typename,
    _user,
)
from dmoerm.data.files import display_name, resolve
from dmoerm.data.reader import _check_limit, _log_report, _read
from dmoerm.data.records import LoadReport, Message, PreferenceRecord, PromptRecord, RecordList

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

"""Reading one field of one row: each helper raises :class:`_FieldError` naming the field (a dotted path such
as ``chosen.answer`` or ``conversation_input[2].role``); the reader (:mod:`dmoerm.data.reader`) adds the file
and the line. A :class:`_Defect` is a known upstream defect of a bundled source: dropped, never raised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dmoerm.data.records import ROLES, Message

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
# Anthropic HH dialogue text (the bundled hh-rlhf set and users' implicit-prompt strings)


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

"""The record types every source becomes, and the prompt keys that keep a prompt in one split.

A :class:`PreferenceRecord` holds a whole conversation (multi-turn kept, unlike the authors' code which drops
the context), two or more candidate responses for the next assistant turn, and their ranking. Chosen/rejected
is the two-response case; equal ranks are ties. A :class:`PromptRecord` is a prompt without responses.

Two keys name a prompt: :func:`prompt_key`, a hash of the conversation with each turn stripped (what
:func:`~dmoerm.data.split_by_prompt` and :func:`~dmoerm.data.with_label_noise` hash, so it decides every
split), and :func:`conversation_key`, the exact turns (what held-out prompt sets compare).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


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


def prompt_key(conversation: Sequence[Message]) -> str:
    """A stable SHA-1 hex hash of the conversation (roles and stripped contents): the key splits and label
    noise hash, so every record on a prompt (from any source, whatever its surrounding whitespace) lands in the
    same split. :attr:`PreferenceRecord.prompt_key` and :attr:`PromptRecord.prompt_key` are this."""
    text = "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in conversation)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def conversation_key(conversation: Sequence[Message]) -> tuple:
    """The exact turns ``((role, content), ...)``: the key of held-out prompt sets (the pipeline's phase-3,
    dev and test prompts), which compare conversations as they are, unstripped."""
    return tuple((m.role, m.content) for m in conversation)


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
        return prompt_key(self.conversation)

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
        return prompt_key(self.conversation)

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

"""Preference data: one record type for every source, loaders, and prompt-disjoint splits.

A :class:`PreferenceRecord` holds a whole conversation (multi-turn kept, unlike the authors' code which drops
the context), two or more candidate responses for the next assistant turn, and their ranking. Chosen/rejected
is the two-response case; equal ranks are ties.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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
        return _prompt_key(self.conversation)

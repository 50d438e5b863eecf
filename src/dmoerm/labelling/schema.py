"""The capability-label JSONL schema that every label source writes and phase 2 reads.

One line per (pair, capability)::

    {"conversation": [{"role": "user", "content": "..."}], "response_a": "...", "response_b": "...",
     "category": "chat", "capability": "empathy", "winner": "a" | "b" | "tie", "confidence": 0.83,
     "judge": "openai:gpt-4o-mini", "raw": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dmoerm.data import DataError, Message

WINNERS = ("a", "b", "tie")


@dataclass(frozen=True)
class CapabilityLabel:
    """Which of two responses is better in terms of one capability point."""

    conversation: tuple[Message, ...]
    response_a: str
    response_b: str
    capability: str
    """The capability point's name in the taxonomy."""
    winner: str
    """``a``, ``b`` or ``tie``."""
    confidence: float = 1.0
    """In [0, 1]: how sure the source is (e.g. the judge's probability averaged over both orders)."""
    category: str | None = None
    judge: str = ""
    """Which source gave the label, e.g. ``openai:gpt-4o-mini``, ``local:SmolLM2-135M-Instruct``, ``human``."""
    raw: str | None = None
    """The judge's raw answer(s), for audit."""

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner: {self.winner!r} is not one of {', '.join(WINNERS)}")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ValueError(f"confidence: {self.confidence} is outside [0, 1]")

    def to_json(self) -> dict:
        return {
            "conversation": [{"role": m.role, "content": m.content} for m in self.conversation],
            "response_a": self.response_a,
            "response_b": self.response_b,
            "category": self.category,
            "capability": self.capability,
            "winner": self.winner,
            "confidence": float(self.confidence),
            "judge": self.judge,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, obj: dict) -> CapabilityLabel:
        conv = tuple(Message(m["role"], m["content"]) for m in obj["conversation"])
        return cls(
            conversation=conv,
            response_a=obj["response_a"],
            response_b=obj["response_b"],
            capability=obj["capability"],
            winner=obj["winner"],
            confidence=float(obj.get("confidence", 1.0)),
            category=obj.get("category"),
            judge=obj.get("judge", ""),
            raw=obj.get("raw"),
        )


def read_labels(path: str | Path) -> list[CapabilityLabel]:
    """Read a label JSONL file; a bad line raises :class:`DataError` naming the file, line and field."""
    path = Path(path)
    labels = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            for key in ("conversation", "response_a", "response_b", "capability", "winner"):
                if key not in obj:
                    raise DataError(f"{path}:{lineno}: field {key!r}: missing")
            try:
                labels.append(CapabilityLabel.from_json(obj))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    return labels


def write_labels(labels: Iterable[CapabilityLabel], path: str | Path) -> None:
    """Write labels as JSONL (atomically: a temp file renamed into place)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for label in labels:
            f.write(json.dumps(label.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)

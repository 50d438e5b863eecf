"""Arena-Hard prompts (v0.1, v2.0): prompt pools for best-of-n and RL."""

from __future__ import annotations

from dmoerm.data.fields import _FieldError, _str, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import PromptRecord


def parser(source: str) -> Parser:
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

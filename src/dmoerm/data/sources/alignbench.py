"""AlignBench Chinese prompts with reference answers."""

from __future__ import annotations

from dmoerm.data.fields import _FieldError, _str, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import PromptRecord


def parser(source: str) -> Parser:
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

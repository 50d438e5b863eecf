"""Auto-J scenario classifier prompts: router training data; category = one of 58 scenarios."""

from __future__ import annotations

from dmoerm.data.fields import _FieldError, _join, _str, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import PromptRecord


def parser(source: str, split: str) -> Parser:
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

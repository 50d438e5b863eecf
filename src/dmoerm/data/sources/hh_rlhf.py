"""Anthropic hh-rlhf: multi-turn dialogues whose last assistant turns are compared."""

from __future__ import annotations

from dmoerm.data.fields import _check_distinct, _hh_split, _str
from dmoerm.data.reader import Parser
from dmoerm.data.records import PreferenceRecord


def parser(source: str, label: str) -> Parser:
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

"""LLMBar: instruction-following pairs with a gold label (natural and adversarial subsets)."""

from __future__ import annotations

from dmoerm.data.fields import _check_distinct, _FieldError, _get, _response, _str, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import PreferenceRecord


def parser(source: str, subset: str) -> Parser:
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

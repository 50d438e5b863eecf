"""The Chinese (and one English) DPO pair sets in ShareGPT form: LLaMA-Factory and MedicalGPT demos."""

from __future__ import annotations

from dmoerm.data.fields import _check_distinct, _conversation, _get, _response
from dmoerm.data.reader import Parser
from dmoerm.data.records import PreferenceRecord

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def parser(source: str, dataset: str, language: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(
            obj, "conversations", role_key="from", content_key="value", role_map=_SHAREGPT_ROLES
        )
        paths = []
        texts = []
        for name in ("chosen", "rejected"):
            v = _get(obj, name)
            path = f"{name}.value" if isinstance(v, dict) else name
            texts.append(_response(obj, path, bundled=True))
            paths.append(path)
        _check_distinct(texts, [0, 1], paths, bundled=True)
        return [
            PreferenceRecord.from_pair(
                conv,
                texts[0],
                texts[1],
                source=source,
                uid=str(lineno),
                meta={"dataset": dataset, "language": language},
            )
        ]

    return parse

"""RMB (Zhou et al. 2024): pairwise and best-of-n sets, multi-turn; category = subset."""

from __future__ import annotations

from typing import Any

from dmoerm.data.fields import _check_distinct, _conversation, _FieldError, _get, _response, _str
from dmoerm.data.reader import Parser
from dmoerm.data.records import PreferenceRecord


def _rmb_meta(obj: dict, models: list[Any]) -> dict:
    return {"category_path": obj.get("category_path"), "models": models}


def pairwise_parser(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(obj, "conversation_input")
        chosen = _response(obj, "chosen.answer", bundled=True)
        rejected = _response(obj, "reject.answer", bundled=True)
        _check_distinct([chosen, rejected], [0, 1], ["chosen.answer", "reject.answer"], bundled=True)
        subset = _str(obj, "subset")
        uid = _get(obj, "pair_uid")
        models = [obj["chosen"].get("llm_name"), obj["reject"].get("llm_name")]
        return [
            PreferenceRecord.from_pair(
                conv,
                chosen,
                rejected,
                category=subset,
                source=source,
                uid=str(uid),
                meta=_rmb_meta(obj, models),
            )
        ]

    return parse


def bon_parser(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        conv = _conversation(obj, "conversation_input")
        best = _response(obj, "bon_best.answer", bundled=True)
        losers = _get(obj, "loser_list")
        if not isinstance(losers, list) or not losers:
            raise _FieldError("loser_list", "expected a non-empty list")
        texts = [best] + [_response(obj, f"loser_list[{i}].answer", bundled=True) for i in range(len(losers))]
        ranks = [0] + [1] * len(losers)
        paths = ["bon_best.answer"] + [f"loser_list[{i}].answer" for i in range(len(losers))]
        _check_distinct(texts, ranks, paths, bundled=True)
        subset = _str(obj, "subset")
        models = [obj["bon_best"].get("llm_name")] + [
            (x.get("llm_name") if isinstance(x, dict) else None) for x in losers
        ]
        return [
            PreferenceRecord(
                tuple(conv),
                tuple(texts),
                tuple(ranks),
                category=subset,
                source=source,
                uid=str(_get(obj, "bon_uid")),
                meta=_rmb_meta(obj, models),
            )
        ]

    return parse

"""PandaLM test set: pairs judged by three annotators, majority vote (no majority = tie)."""

from __future__ import annotations

from dmoerm.data.fields import _check_distinct, _FieldError, _get, _join, _response, _str, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import LoadReport, PreferenceRecord


def _pandalm_response(obj: dict, path: str, report: LoadReport) -> tuple[str, bool]:
    v = _get(obj, path)
    if isinstance(v, bool):
        # The upstream JSON holds a few bare booleans where the model answered "True"/"False".
        report.coerced += 1
        return ("True" if v else "False"), True
    return _response(obj, path, bundled=True), False


def parser(source: str, report: LoadReport) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        instruction = _str(obj, "instruction")
        assert instruction is not None
        prompt = _join(instruction, _str(obj, "input", optional=True))
        r1, c1 = _pandalm_response(obj, "response1", report)
        r2, c2 = _pandalm_response(obj, "response2", report)
        votes = []
        for k in ("annotator1", "annotator2", "annotator3"):
            v = _get(obj, k)
            if isinstance(v, bool) or v not in (0, 1, 2):
                raise _FieldError(k, f"expected 0 (tie), 1 or 2, got {v!r}")
            votes.append(v)
        counts = {v: votes.count(v) for v in set(votes)}
        top, n = max(counts.items(), key=lambda kv: kv[1])
        winner = top if n >= 2 else 0  # no majority (0, 1, 2) -> tie
        tie = winner == 0
        chosen, rejected = (r2, r1) if winner == 2 else (r1, r2)
        _check_distinct([chosen, rejected], [0, 0 if tie else 1], ["response1", "response2"], bundled=True)
        meta = {
            "votes": votes,
            "winner": winner,
            "motivation_app": obj.get("motivation_app"),
            "cmp_key": obj.get("cmp_key"),
        }
        if c1 or c2:
            meta["coerced_bool"] = [i for i, c in ((1, c1), (2, c2)) if c]
        return [
            PreferenceRecord.from_pair(
                _user(prompt),
                chosen,
                rejected,
                tie=tie,
                source=source,
                uid=str(obj.get("idx", lineno)),
                meta=meta,
            )
        ]

    return parse

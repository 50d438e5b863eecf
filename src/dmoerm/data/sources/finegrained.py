"""FineGrainedRLHF qa-feedback: four answers ranked from six pairwise preferences."""

from __future__ import annotations

from collections.abc import Sequence

from dmoerm.data.fields import _check_distinct, _FieldError, _get, _response, _str, _typename, _user
from dmoerm.data.reader import Parser
from dmoerm.data.records import PreferenceRecord

_FG_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
"""FineGrainedRLHF's ``preference`` order: 1vs2, 1vs3, 1vs4, 2vs3, 2vs4, 3vs4 (0-based prediction indices)."""


def _fg_prompt(question: str, passages: list) -> str:
    blocks = []
    for i, p in enumerate(passages, 1):
        if not isinstance(p, list) or not p or not all(isinstance(s, str) for s in p):
            raise _FieldError(f"passages[{i - 1}]", "expected a list of strings (title, then sentences)")
        title, sentences = p[0], list(p[1:])
        if sentences and sentences[0].startswith(title + "\n\n"):  # the first sentence repeats the title
            sentences[0] = sentences[0][len(title) + 2 :]
        blocks.append(f"[{i}] {title}\n" + " ".join(s.strip() for s in sentences if s.strip()))
    if not blocks:
        return question.strip()
    # The question goes last: prompts are cut from the left to fit the model (the passages' median is ~700
    # tokens), and the question is what must survive.
    return "Passages:\n" + "\n\n".join(blocks) + "\n\nQuestion: " + question.strip()


def _fg_ranks(prefs: Sequence[int]) -> list[int] | None:
    """Dense ranks (0 best) consistent with all six pairwise preferences, or None when none exists."""
    wins = [0, 0, 0, 0]
    for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
        if v == 1:
            wins[i] += 1
        elif v == 2:
            wins[j] += 1
    levels = sorted(set(wins), reverse=True)
    ranks = [levels.index(w) for w in wins]
    for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
        want = 0 if ranks[i] == ranks[j] else (1 if ranks[i] < ranks[j] else 2)
        if want != v:
            return None
    return ranks


def parser(source: str) -> Parser:
    def parse(obj: dict, lineno: int) -> list[PreferenceRecord]:
        question = _str(obj, "question")
        assert question is not None
        passages = _get(obj, "passages")
        if not isinstance(passages, list):
            raise _FieldError("passages", f"expected a list, got {_typename(passages)}")
        prompt = _fg_prompt(question, passages)
        preds = [_response(obj, f"prediction {k}", bundled=True) for k in range(1, 5)]
        prefs = _get(obj, "preference")
        if not isinstance(prefs, list) or len(prefs) != 6:
            raise _FieldError(
                "preference", "expected a list of 6 values (1vs2, 1vs3, 1vs4, 2vs3, 2vs4, 3vs4)"
            )
        for i, v in enumerate(prefs):
            if isinstance(v, bool) or v not in (0, 1, 2):
                raise _FieldError(f"preference[{i}]", f"expected 0 (no preference), 1 or 2, got {v!r}")
        feedback = _get(obj, "feedback")
        base_meta = {
            "gold": obj.get("gold"),
            "preference": list(prefs),
            "passages": passages,
        }
        ranks = _fg_ranks(prefs)
        conv = _user(prompt)
        if ranks is not None:
            _check_distinct(preds, ranks, [f"prediction {k}" for k in range(1, 5)], bundled=True)
            meta = dict(base_meta, consistent=True, prediction_ids=[1, 2, 3, 4])
            meta["feedback"] = [feedback, None, None, None]
            return [
                PreferenceRecord(
                    tuple(conv),
                    tuple(preds),
                    tuple(ranks),
                    category="long_form_qa",
                    source=source,
                    uid=str(lineno),
                    meta=meta,
                )
            ]
        out = []
        for (i, j), v in zip(_FG_PAIRS, prefs, strict=True):
            first, second = (j, i) if v == 2 else (i, j)
            meta = dict(base_meta, consistent=False, prediction_ids=[first + 1, second + 1])
            meta["feedback"] = [feedback if first == 0 else None, feedback if second == 0 else None]
            pair_ranks = [0, 0 if v == 0 else 1]
            _check_distinct(
                [preds[first], preds[second]],
                pair_ranks,
                [f"prediction {first + 1}", f"prediction {second + 1}"],
                bundled=True,
            )
            out.append(
                PreferenceRecord.from_pair(
                    conv,
                    preds[first],
                    preds[second],
                    tie=v == 0,
                    category="long_form_qa",
                    source=source,
                    uid=f"{lineno}-{i + 1}v{j + 1}",
                    meta=meta,
                )
            )
        return out

    return parse

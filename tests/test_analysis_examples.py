"""The study's analysis scripts (examples/) on run folders written here: exact figures from known inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_eval(run: Path, folder: str, agreements: dict[str, float]) -> None:
    per = [{"category": c, "agreement": {"value": v}} for c, v in agreements.items()]
    (run / "eval" / folder).mkdir(parents=True)
    (run / "eval" / folder / "eval.json").write_text(json.dumps({"per_category": per}))


def test_per_category_gap_reads_each_systems_saved_evaluation(tmp_path, capsys):
    gap = _load("per_category_gap")
    run = tmp_path / "n384_seed0"
    _write_eval(run, "DMoERM", {"code": 0.70, "safety": 0.77})
    _write_eval(run, "per_category_RMs_routed", {"code": 0.72, "safety": 0.75})
    _write_eval(run, "single_RM", {"code": 0.73, "safety": 0.75})
    got = gap.gaps(run)
    assert got["code"] == pytest.approx((-3.0, -1.0)) and got["safety"] == pytest.approx((2.0, 0.0))
    other = tmp_path / "n384_seed1"  # a second run: the last column is the mean over runs
    _write_eval(other, "DMoERM", {"code": 0.74})
    _write_eval(other, "per_category_RMs_routed", {"code": 0.76})
    _write_eval(other, "single_RM", {"code": 0.72})
    assert gap.main([str(run), str(other)]) == 0
    out = capsys.readouterr().out
    assert "| category | n384_seed0 | n384_seed1 | mean |" in out
    assert "| code | -3.0 / -1.0 | +2.0 / +4.0 | -0.5 / +1.5 |" in out
    assert "| safety | +2.0 / +0.0 | - | +2.0 / +0.0 |" in out


def test_paired_difference_resamples_records_for_both_systems_alike():
    paired = _load("paired_difference")
    a = [[1.0, 1.0], [0.0], [1.0]]  # per record, each pair's outcome
    b = [[1.0, 0.0], [0.0], [0.5]]
    d, lo, hi = paired.paired_difference(a, b, resamples=500)
    assert d == pytest.approx(100 * (3 - 1.5) / 4)
    assert lo <= d <= hi and lo >= 0.0  # a is never worse than b on any record
    assert paired.agreement(a) == pytest.approx(75.0)


def test_paired_difference_splits_pairs_by_which_answer_is_longer():
    paired = _load("paired_difference")
    records = [
        _pair("code", "a long answer", "short"),
        _pair("code", "tiny", "much longer"),
        _pair("chat", "ab", "cd"),
    ]
    shorter, longer = paired.by_length(records, [[1.0], [0.0], [0.5]])
    assert shorter == [[], [0.0], []] and longer == [[1.0], [], []]  # equal lengths are in neither


def _pair(category: str, chosen: str, rejected: str, ranks=(0, 1)):
    from dmoerm.data import Message, PreferenceRecord

    user = (Message("user", f"a {category} prompt"),)
    return PreferenceRecord(user, (chosen, rejected), ranks, category=category, source="rmb/test")


def test_length_conflict_keeps_only_shorter_chosen_pairs_in_the_concise_categories(tmp_path, capsys):
    conflict = _load("length_conflict_data")
    records = [
        _pair("code", "short", "much longer"),  # kept: the chosen answer is the shorter
        _pair("code", "much longer", "short"),  # dropped
        _pair("code", "same!", "same?", ranks=(0, 0)),  # a tie: dropped
        _pair("chat", "much longer", "short"),  # another category: kept whatever the lengths
        _pair("chat", "short", "much longer"),
        _pair(None, "short", "much longer"),  # no category: no inner model can take it
    ]
    kept = conflict.conflict_records(records, {"code"})
    assert kept == [records[0], records[3], records[4]]
    assert conflict.shorter_chosen(_pair("code", "much longer", "short", ranks=(1, 0)))
    # The script writes what the pipeline reads back: same records, same categories.
    from dmoerm.data import load_jsonl

    out = tmp_path / "conflict.jsonl"
    conflict.save_jsonl(kept, out)
    again = load_jsonl(out)
    assert [(r.category, r.responses, r.ranks) for r in again] == [
        (r.category, r.responses, r.ranks) for r in kept
    ]

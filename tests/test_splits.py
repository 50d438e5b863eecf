"""The pipeline's prompt-disjoint splits: a larger test share nests the smaller one's test prompts."""

from __future__ import annotations

import pytest

from dmoerm.data import split_by_prompt
from dmoerm.pipeline import DataConfig, build_splits
from helpers import length_records

BIG = 10**6  # take every record a split has


def _splits(records, **shares):
    cfg = DataConfig(phase1_records=BIG, phase3_records=BIG, dev_records=BIG, test_records=BIG, **shares)
    return build_splits(records, ["code"], cfg)


@pytest.fixture
def records():
    return length_records(400, category="code")


def test_default_shares_are_the_fixed_80_10_10_split(records):
    old = split_by_prompt(records, {"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)
    s = _splits(records)
    assert sorted(r.uid for r in s.test["code"]) == sorted(r.uid for r in old["test"])
    assert sorted(r.uid for r in s.dev["code"]) == sorted(r.uid for r in old["dev"])


def test_a_larger_test_share_keeps_every_smaller_share_test_prompt_and_stays_disjoint(records):
    small, large = _splits(records), _splits(records, test_share=0.35)
    small_test = {r.prompt_key for r in small.test["code"]}
    large_test = {r.prompt_key for r in large.test["code"]}
    assert small_test < large_test
    assert 0.25 * len(records) < len(large_test) < 0.45 * len(records)
    trained = {r.prompt_key for part in (large.phase1, large.phase3, large.dev) for r in part["code"]}
    assert not trained & large_test


@pytest.mark.parametrize(
    "shares, match",
    [
        ({"test_share": 0.0}, "test_share must be in"),
        ({"test_share": 1.0}, "test_share must be in"),
        ({"dev_share": -0.1}, "dev_share in"),
        ({"test_share": 0.5, "dev_share": 0.4}, "leaves under 0.2 of the prompts"),
    ],
)
def test_bad_shares_are_named(shares, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**shares)

# ruff: noqa: F811  (tests take the imported `trained` fixture as an argument)
"""Cross-fitted sign-test gates (``specialise.gate_cross_fit``): each half of dev picks its own best evaluation,
that pick is tested on the other half, and the halves' counts are summed into one sign test."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from dmoerm.aggregator import Aggregator
from dmoerm.encoding import RankedItem, encode_record
from dmoerm.model import rm_expert
from dmoerm.pipeline import PipelineConfig, SpecialiseConfig, stage_inputs
from dmoerm.training import phases
from dmoerm.training.gates import cross_fit_gate, cross_fit_pending, halves
from dmoerm.training.loop import TrainResult, score_items, train_expert
from dmoerm.training.phases import (
    WARM_START,
    AggregatorTrainConfig,
    train_phase1,
    train_phase3,
    train_warm_start,
)
from dmoerm.training.trunk_cache import TrunkCache
from helpers import length_records
from test_dmoerm import (
    FAST,
    make_model,
    trained,  # noqa: F401  (the module-scoped fixture)
)

ITEMS = [RankedItem((None, None), ((0, 1),)) for _ in range(8)]  # one pair each, the first response better


def evaluation(right: set[int]) -> list[list[float]]:
    """Rewards per item of :data:`ITEMS` ranking the pairs of ``right`` right and the others wrong."""
    return [[1.0, 0.0] if i in right else [0.0, 1.0] for i in range(len(ITEMS))]


START = evaluation({0, 1, 4, 5})  # half of each half right


def test_halves_split_dev_in_two():
    assert halves(8) == (range(0, 4), range(4, 8)) and halves(5) == (range(0, 2), range(2, 5))


def test_a_pick_that_only_fits_its_own_half_is_not_kept():
    """Each evaluation after the start is perfect on one half and wrong on the other: each half picks the one
    that fits it, and on the other half that pick turns the start's right pairs wrong."""
    evaluations = [START, evaluation({0, 1, 2, 3}), evaluation({4, 5, 6, 7})]
    gate = cross_fit_gate(ITEMS, evaluations, patience=0, alpha=0.1)
    assert gate == {
        "turned_right": 0,
        "turned_wrong": 4,
        "p": 1.0,
        "kept": False,
        "halves": [
            {"picked": 1, "turned_right": 0, "turned_wrong": 2},
            {"picked": 2, "turned_right": 0, "turned_wrong": 2},
        ],
    }


def test_a_real_gain_is_counted_on_every_dev_record():
    """An evaluation right on every pair: both halves pick it, each counts its 2 gains on the other half, and
    the summed 4 / 0 (p = 1/16) passes at 0.1, where one held-back half's 2 / 0 (p = 1/4) could not."""
    evaluations = [START, evaluation(set(range(8)))]
    gate = cross_fit_gate(ITEMS, evaluations, patience=2, alpha=0.1)
    assert (gate["turned_right"], gate["turned_wrong"], gate["p"], gate["kept"]) == (4, 0, 1 / 16, True)
    assert [h["picked"] for h in gate["halves"]] == [1, 1]
    assert cross_fit_gate(ITEMS, evaluations, patience=2, alpha=0.05)["kept"] is False


def test_each_half_stops_on_its_own_patience():
    """The first half gets worse at evaluation 1 and perfect at 2: with patience 1 it has stopped before 2 and
    keeps the start (nothing to test), with patience 2 it reaches 2."""
    evaluations = [START, evaluation({4, 5, 6, 7}), evaluation(set(range(8)))]
    short, long = (cross_fit_gate(ITEMS, evaluations, p, 0.5)["halves"] for p in (1, 2))
    assert short[0] == {"picked": 0, "turned_right": 0, "turned_wrong": 0}
    assert long[0]["picked"] == 2 and long[0]["turned_right"] == 2
    assert short[1]["picked"] == long[1]["picked"] == 1  # the second half: perfect at 1, then no gain


def test_training_is_pending_until_both_halves_ran_out_of_patience():
    worse_first = evaluation({4, 5, 6, 7})  # the first half loses ground, the second gains
    assert cross_fit_pending(ITEMS, [], 1) is True
    assert cross_fit_pending(ITEMS, [START, worse_first], 1) is True  # the second half just improved
    assert cross_fit_pending(ITEMS, [START, worse_first, worse_first], 1) is False
    assert cross_fit_pending(ITEMS, [START, worse_first, worse_first], 0) is True  # patience 0 never stops
    assert cross_fit_pending(ITEMS[:1], [START[:1]], 1) is False  # one record: no halves to wait for
    assert cross_fit_gate(ITEMS[:1], [START[:1]], 1, 0.5) == {}


def _code_items(model, n: int, seed: int):
    return [
        encode_record(model.tokenizer, r, model.max_length) for r in length_records(n, seed, category="code")
    ]


def test_pending_trains_on_past_early_stopping_and_keeps_its_pick(tiny_backbone):
    """The same run with ``pending`` always true trains every epoch (the same steps first), keeps every
    evaluation's dev rewards, and hands back early stopping's pick: the plain run's weights exactly."""
    config = dataclasses.replace(FAST, epochs=6, learning_rate=5e-2, early_stopping_patience=1)
    runs = []
    for pending in (None, lambda evaluations: True):
        model = make_model(tiny_backbone)
        code = _code_items(model, 16, seed=0)
        model.bank.add_expert("code__rm")
        result = train_expert(
            model.bank,
            "code__rm",
            code[:12],
            code[12:],
            config,
            TrunkCache(),
            evaluate_first=True,
            pending=pending,
        )
        runs.append((result, score_items(model.bank, "code__rm", code, TrunkCache())))
    (plain, plain_scores), (longer, longer_scores) = runs
    assert plain.stopped_early and not longer.stopped_early
    evals = len(plain.history["dev_agreement"])
    assert len(longer.history["dev_agreement"]) == config.epochs + 1 > evals
    assert longer.history["dev_agreement"][:evals] == plain.history["dev_agreement"]
    assert plain.dev_rewards == [] and len(longer.dev_rewards) == config.epochs + 1
    assert longer.best_dev_agreement == plain.best_dev_agreement and longer_scores == plain_scores


def test_cross_fitted_phase1_goes_back_to_its_start_unless_the_halves_agree(tiny_backbone):
    model = make_model(tiny_backbone)
    cache = TrunkCache()
    code = _code_items(model, 24, seed=1)
    train_warm_start(model, code[:8], code[8:12], FAST, cache, progress=False)
    fast = dataclasses.replace(FAST, learning_rate=5e-2)
    gated = dict(progress=False, init_from=WARM_START, gate_alpha=1e-9, cross_fit=True)
    res = train_phase1(model, "code", code[:12], code[12:], fast, cache, **gated)
    gate = res.gate
    assert gate["kept"] is False and len(gate["halves"]) == 2 and len(res.dev_rewards) >= 2
    assert gate["turned_right"] == sum(h["turned_right"] for h in gate["halves"])
    assert gate["turned_wrong"] == sum(h["turned_wrong"] for h in gate["halves"])
    got, start = (score_items(model.bank, e, code, cache) for e in (rm_expert("code"), WARM_START))
    assert got == start
    assert res.dev_rewards[0] == score_items(model.bank, WARM_START, code[12:], cache)  # the start came first
    # The gate's counts are those cross_fit_gate gives on the recorded evaluations.
    again = cross_fit_gate(code[12:], res.dev_rewards, fast.early_stopping_patience, 1e-9)
    assert again == gate


def test_cross_fitted_phase3_tracker_counts_each_half_on_the_other():
    """A correction that turns all 6 dev pairs right: each half of 3 picks it and counts 3 gains on the other
    half (6 / 0, p = 1/64, kept), where the plain gate on either half alone (p = 1/8) would not pass."""
    items = [RankedItem((None, None), ((0, 1),)) for _ in range(6)]
    first = torch.tensor([0.0, 1.0] * 6)  # [N]: the start (expert 0) ranks every pair wrong
    data = (
        torch.zeros(2, 12, 4),
        torch.stack([first, 1.0 - first]),
        [[2 * i, 2 * i + 1] for i in range(6)],
        None,
    )
    agg = Aggregator(2, 4, kind="linear")
    tracker = phases._BestOnDev(agg, items, data, patience=0, cross_fit=True)
    result = TrainResult()
    tracker.evaluate(result)
    tracker.keep_start()
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([0.0, 1.0]))
    tracker.evaluate(result)
    tracker.restore()
    gate = tracker.gate(0.05, result)
    assert (gate["turned_right"], gate["turned_wrong"], gate["p"], gate["kept"]) == (6, 0, 1 / 64, True)
    assert agg.weight.tolist() == [0.0, 1.0]
    assert tracker.gate(1 / 64, result)["kept"] is False and agg.weight.tolist() == [1.0, 0.0]
    assert result.best_dev_agreement == 0.0  # the start's


def test_cross_fitted_phase3_records_the_halves(trained):
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
    config = AggregatorTrainConfig(epochs=3, aggregator="residual", learning_rate=1e-2, gate_alpha=1e-9)
    res = train_phase3(model, "code", items[20:32], items[32:40], config, TrunkCache(), cross_fit=True)
    assert res.gate["kept"] is False and [len(h) for h in res.gate["halves"]] == [3, 3]
    assert torch.count_nonzero(model.aggregators["code"].mlp[-1].weight) == 0  # back at "no correction"


def test_cross_fit_config_is_checked_and_recorded_only_when_on():
    with pytest.raises(
        ValueError, match="gate_cross_fit: cross-fitting splits dev itself, so gate_share must be 0"
    ):
        SpecialiseConfig(gate_cross_fit=True, gate_share=0.5)
    with pytest.raises(ValueError, match="gate_cross_fit: must be true or false, got 'yes'"):
        SpecialiseConfig(gate_cross_fit="yes")
    assert "specialise.gate_cross_fit" not in stage_inputs(PipelineConfig(), "phase1/code")
    crossed = PipelineConfig(specialise=SpecialiseConfig(gate_cross_fit=True))
    assert stage_inputs(crossed, "phase1/code")["specialise.gate_cross_fit"] is True
    assert stage_inputs(crossed, "phase3/code")["specialise.gate_cross_fit"] is True


def test_a_cross_fitted_phase1_killed_mid_run_resumes_to_the_same_gate(tiny_backbone, tmp_path):
    """The evaluations the gate reads are in the phase-1 checkpoint: killed after epoch 1 and rerun, the run
    records the straight run's evaluations and gate, and ends with its weights."""
    from helpers import killed_in_epoch_two

    fast = dataclasses.replace(FAST, learning_rate=5e-2, epochs=3)
    gated = dict(progress=False, init_from=WARM_START, gate_alpha=0.5, cross_fit=True)
    runs = []
    for kill in (False, True):
        model = make_model(tiny_backbone)
        cache = TrunkCache()
        code = _code_items(model, 24, seed=1)
        train_warm_start(model, code[:8], code[8:12], FAST, cache, progress=False)
        ckpt = tmp_path / f"kill{kill}"
        call = functools.partial(
            train_phase1, model, "code", code[:12], code[12:], fast, cache, ckpt, **gated
        )
        if kill:
            killed_in_epoch_two(call)
        res = call()
        runs.append((res, score_items(model.bank, rm_expert("code"), code, cache)))
    (straight, straight_scores), (resumed, resumed_scores) = runs
    assert resumed.dev_rewards == straight.dev_rewards and resumed.gate == straight.gate
    assert torch.allclose(torch.tensor(resumed_scores), torch.tensor(straight_scores), atol=1e-6)

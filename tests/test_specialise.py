# ruff: noqa: F811  (tests take the imported `trained` fixture as an argument)
"""Issue 13's specialisation levers: rehearsal of the other categories' records in phase 1
(``specialise.replay``), a smaller warm-started step (``specialise.learning_rate``), the pooled start as a
shared expert in every aggregator (``specialise.shared_expert``) and the ``linear`` aggregator over the experts'
scalar scores."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dmoerm.aggregator import Aggregator
from dmoerm.config_check import RunStopped
from dmoerm.data import Message
from dmoerm.encoding import RankedItem, encode_record
from dmoerm.model import load_model, rm_expert
from dmoerm.pipeline import PipelineConfig, SpecialiseConfig, run_pipeline, stage_inputs
from dmoerm.pipeline import stages as pipeline_stages
from dmoerm.pipeline.stages import replay_items
from dmoerm.pipeline.state import _recorded
from dmoerm.training import phases
from dmoerm.training.loop import TrainResult, score_items
from dmoerm.training.phases import (
    WARM_START,
    AggregatorTrainConfig,
    sign_test_p,
    train_phase1,
    train_phase3,
    train_warm_start,
)
from dmoerm.training.trunk_cache import TrunkCache
from helpers import job_config, length_records
from test_dmoerm import (
    FAST,
    make_model,
    trained,  # noqa: F401  (the module-scoped fixture)
)


def test_linear_aggregator_is_the_weighted_sum_of_scores():
    agg = Aggregator(3, 4, kind="linear")
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.5, -1.0]])  # [K=3, B=2]
    hidden = torch.randn(3, 2, 4)  # ignored by the linear kind
    out = agg(hidden, scores)
    assert torch.equal(out, torch.tensor([0.5 - 3.0 + 1.0, 1.0 + 0.0 - 2.0]))
    with pytest.raises(ValueError, match="a linear aggregator needs the experts' scores"):
        agg(hidden)
    # K weights, one per expert, not an MLP over K*H states (its start at the phase-1 reward: test_levers.py).
    assert [p.shape for p in agg.parameters()] == [torch.Size([3])]


def test_linear_phase3_trains_only_its_weights_and_saves_them(trained, tmp_path):
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
    # The code aggregator is replaced; everything else (backbone, experts, router, other aggregators) stays.
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("aggregators.code.")}
    config = AggregatorTrainConfig(
        epochs=3, aggregator="linear", learning_rate=5e-2, early_stopping_patience=0
    )
    res = train_phase3(model, "code", items[20:36], [], config, TrunkCache())
    assert res.steps > 0
    agg = model.aggregators["code"]
    assert model.aggregator_experts["code"][0] == rm_expert("code")
    # Every weight moved from its start (1, 0, ..., 0) and nothing outside the aggregator did.
    start = torch.tensor([1.0] + [0.0] * (agg.num_experts - 1))
    assert torch.all(agg.weight != start)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    convs, resps = [list(r.conversation) for r in recs[:4]], [r.responses[0] for r in recs[:4]]
    before = model.score(convs, resps)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.aggregators["code"].kind == "linear"
    assert [o.reward for o in loaded.score(convs, resps)] == pytest.approx(
        [o.reward for o in before], abs=1e-6
    )


def test_replay_draws_other_categories_records_reproducibly():
    config = PipelineConfig(specialise=SpecialiseConfig(replay=1.5))
    phase1 = {"code": list(range(4)), "chat": list(range(100, 110)), "safety": list(range(200, 202))}
    got = replay_items(config, phase1, "code")
    assert len(got) == 6 and len(set(got)) == 6
    assert not set(got) & set(phase1["code"])
    assert got == replay_items(config, phase1, "code")  # the same on a rerun (and on every rank)
    assert got != replay_items(config, phase1, "chat")[:6]
    # Capped at what the other categories hold; none at the default.
    assert len(replay_items(config, phase1, "chat")) == 6  # 15 asked, 4 + 2 held by the others
    assert replay_items(PipelineConfig(), phase1, "code") == []


def test_bad_specialise_values_are_named():
    with pytest.raises(ValueError, match=r"replay: must be a number in \[0, 100\], got -1"):
        SpecialiseConfig(replay=-1)
    with pytest.raises(ValueError, match="learning_rate: must be > 0 or null, got 0"):
        SpecialiseConfig(learning_rate=0)
    with pytest.raises(ValueError, match="specialise.shared_expert: true needs a pooled start"):
        PipelineConfig(specialise=SpecialiseConfig(shared_expert=True))
    # The main job's cold-start ablation: the smaller step is for a warm start and is not used without one.
    main = Path(__file__).resolve().parents[1] / "configs" / "main.yaml"
    cold = PipelineConfig.from_file(main, ["warm_start=none"])
    assert cold.specialise.learning_rate == 1e-4 and cold.phase1.learning_rate == 1e-3
    with pytest.raises(ValueError, match="specialise.replay"):
        PipelineConfig.from_dict({"specialise": {"replay": "lots"}})


def test_default_specialise_is_not_a_recorded_input():
    """Run folders made before the section existed resume: its defaults specialise exactly as they did."""
    plain = PipelineConfig(warm_start="baseline")
    assert not any(k.startswith("specialise") for k in stage_inputs(plain, "phase3/code"))
    shared = PipelineConfig(warm_start="baseline", specialise=SpecialiseConfig(shared_expert=True, replay=1))
    assert stage_inputs(shared, "phase3/code")["specialise.shared_expert"] is True
    assert "specialise.shared_expert" not in stage_inputs(shared, "phase1/code")  # phase 3 alone reads it
    assert stage_inputs(shared, "phase1/code")["specialise.replay"] == 1
    assert "phase3.gate_alpha" not in stage_inputs(plain, "phase3/code")
    plain.phase3 = AggregatorTrainConfig(aggregator="residual", gate_alpha=0.05)
    assert stage_inputs(plain, "phase3/code")["phase3.gate_alpha"] == 0.05
    # A folder that wrote such a field down at its old value compares equal too; any other value does not.
    recorded = {"data.dev_share": 0.1, "data.test_share": 0.35, "phase1.epochs": 3}
    assert _recorded(recorded) == {"data.test_share": 0.35, "phase1.epochs": 3}


def test_pipeline_specialises_with_replay_step_and_shared_expert(tmp_path, tiny_backbone, monkeypatch):
    seen = {}
    real = pipeline_stages.train_phase1

    def spy(model, category, train, dev, config, *args, **kwargs):
        seen[category] = (len(train), config.learning_rate)
        return real(model, category, train, dev, config, *args, **kwargs)

    monkeypatch.setattr(pipeline_stages, "train_phase1", spy)
    overrides = dict(
        warm_start="baseline",
        labels={"source": "none"},
        phase3={"epochs": 2, "batch_size": 8, "aggregator": "linear"},
        specialise={"replay": 0.5, "learning_rate": 1e-4, "shared_expert": True},
    )
    config = job_config(tmp_path, tiny_backbone, **overrides)
    run_pipeline(config, progress=False)
    out = tmp_path / "run"
    state = json.loads((out / "state.json").read_text())
    for c in ("code", "chat"):
        assert seen[c] == (12 + 6, 1e-4)  # 12 own records and half as many of the other category's
        assert state[f"phase1/{c}"]["replayed_records"] == 6
        assert state[f"phase3/{c}"]["experts"] == [rm_expert(c), WARM_START]
    model = load_model(out / "model")
    assert model.aggregator_experts["code"] == [rm_expert("code"), WARM_START]
    assert model.aggregators["code"].kind == "linear"
    convs = [[Message("user", f"def f(): pass #{i}")] for i in range(3)]
    scores = model.score(convs, ["ok", "a longer answer", "x"])
    assert all(s.reward == s.reward for s in scores)
    # A changed lever is a changed input: the rerun stops and names it.
    changed = job_config(tmp_path, tiny_backbone, **dict(overrides, specialise={"replay": 1.0}))
    changed.specialise.shared_expert, changed.specialise.learning_rate = True, 1e-4
    with pytest.raises(RunStopped, match=r"specialise.replay: 0.5 -> 1.0"):
        run_pipeline(changed, progress=False)


def test_sign_test_p_is_exact():
    assert sign_test_p(5, 0) == 1 / 32
    assert sign_test_p(3, 1) == (4 + 1) / 16
    assert sign_test_p(0, 3) == 1.0 and sign_test_p(0, 0) == 1.0


def _flipping_dev(n_pairs: int):
    """Dev items of two responses each (the first better) and the scores of two experts: the first expert
    (the start, weight 1) ranks every pair wrong, the second ranks every pair right."""
    items = [RankedItem((None, None), ((0, 1),)) for _ in range(n_pairs)]
    first = torch.tensor([0.0, 1.0] * n_pairs)  # [N]: worse above better
    scores = torch.stack([first, 1.0 - first])  # [K=2, N]
    where = [[2 * i, 2 * i + 1] for i in range(n_pairs)]
    return items, (torch.zeros(2, 2 * n_pairs, 4), scores, where, None)


def _corrected_on_dev(n_pairs: int):
    """A linear aggregator tracked on :func:`_flipping_dev`, its start recorded, then set to the correction
    that turns every dev pair right and restored as the best epoch: (aggregator, tracker, result)."""
    items, data = _flipping_dev(n_pairs)
    agg = Aggregator(2, 4, kind="linear")
    tracker = phases._BestOnDev(agg, items, data, patience=0)
    result = TrainResult()
    tracker.evaluate(result)
    tracker.keep_start()
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([0.0, 1.0]))  # the trained correction: every pair right
    tracker.evaluate(result)
    tracker.restore()
    return agg, tracker, result


@pytest.mark.parametrize("n_pairs, kept", [(6, True), (4, False)])
def test_the_gate_keeps_a_correction_only_when_dev_is_sure(n_pairs, kept):
    """A correction that turns every dev pair right is kept at alpha 0.05 on 6 pairs (p = 1/64) but not on 4
    (p = 1/16): with too few dev pairs the aggregator goes back to exactly its start."""
    agg, tracker, result = _corrected_on_dev(n_pairs)
    assert result.best_dev_agreement == 1.0
    gate = tracker.gate(0.05, result)
    assert gate == {"turned_right": n_pairs, "turned_wrong": 0, "p": 0.5**n_pairs, "kept": kept}
    assert agg.weight.tolist() == ([0.0, 1.0] if kept else [1.0, 0.0])
    assert result.best_dev_agreement == (1.0 if kept else 0.0)


def test_gated_phase3_records_the_gate(trained):
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
    config = AggregatorTrainConfig(epochs=3, aggregator="residual", learning_rate=1e-2, gate_alpha=1e-9)
    res = train_phase3(model, "code", items[20:36], items[36:40], config, TrunkCache())
    # No dev set makes p < 1e-9: the correction's output layer is back at exactly zero.
    assert res.gate["kept"] is False and res.gate["p"] >= 1e-9
    assert torch.count_nonzero(model.aggregators["code"].mlp[-1].weight) == 0
    # Held gate records: the test counts their pairs only (one pair each), dev still picks the epoch.
    res = train_phase3(
        model, "code", items[20:32], items[32:36], config, TrunkCache(), gate_items=items[36:40]
    )
    assert res.gate["turned_right"] + res.gate["turned_wrong"] <= 4 and res.gate["kept"] is False
    with pytest.raises(ValueError, match=r"gate_alpha: must be in \(0, 1\], got 0"):
        AggregatorTrainConfig(aggregator="residual", gate_alpha=0)
    with pytest.raises(ValueError, match="gate_alpha: the gate compares a correction with its start"):
        AggregatorTrainConfig(aggregator="mlp", gate_alpha=0.05)


def test_gated_phase1_goes_back_to_exactly_its_start(tiny_backbone):
    """A warm-started phase 1 whose specialisation does not pass the sign test (alpha 1e-9: none can) scores
    exactly as its start afterwards; ``copy_expert`` copies adapter and head, and names a missing expert."""
    model = make_model(tiny_backbone)
    cache = TrunkCache()
    tok, n = model.tokenizer, model.max_length
    code = [encode_record(tok, r, n) for r in length_records(16, seed=0, category="code")]
    train_warm_start(model, code[:8], code[8:], FAST, cache, progress=False)
    fast = dataclasses.replace(FAST, learning_rate=5e-2)
    gated = dict(progress=False, init_from=WARM_START, gate_alpha=1e-9)
    res = train_phase1(model, "code", code[:12], code[12:], fast, cache, **gated)
    assert res.steps > 0 and res.gate["kept"] is False and res.gate["p"] >= 1e-9
    got, start = (score_items(model.bank, e, code, cache) for e in (rm_expert("code"), WARM_START))
    assert got == start
    with pytest.raises(ValueError, match="copy_expert: no expert named 'chat__rm'"):
        model.bank.copy_expert("chat__rm", WARM_START)
    # Without the gate (alpha 1.0) the specialised weights stay and no gate is recorded.
    res = train_phase1(model, "code", code[:12], code[12:], fast, cache, progress=False, init_from=WARM_START)
    assert res.gate == {}
    with pytest.raises(ValueError, match=r"gate_alpha: must be in \(0, 1\], got 2"):
        SpecialiseConfig(gate_alpha=2)


def test_gate_split_holds_back_the_last_share_of_dev_for_the_gates():
    dev = list(range(10))
    config = PipelineConfig(specialise=SpecialiseConfig(gate_share=0.3))
    assert pipeline_stages.gate_split(config, dev) == ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert pipeline_stages.gate_split(PipelineConfig(), dev) == (dev, None)  # share 0: one dev for both
    assert pipeline_stages.gate_split(config, [0]) == ([0], None)  # early stopping keeps a record at least
    assert pipeline_stages.gate_split(config, dev, gated=False) == (
        dev,
        None,
    )  # no gate: early stopping reads all
    config.specialise.gate_share = 0.9
    assert pipeline_stages.gate_split(config, [0, 1]) == ([0], [1])
    with pytest.raises(ValueError, match=r"gate_share: must be a share in \[0, 1\), got 1"):
        SpecialiseConfig(gate_share=1)
    assert "specialise.gate_share" not in stage_inputs(PipelineConfig(), "phase1/code")
    held = PipelineConfig(specialise=SpecialiseConfig(gate_share=0.5))
    assert stage_inputs(held, "phase3/code")["specialise.gate_share"] == 0.5
    assert "specialise.gate_share" not in stage_inputs(
        held, "baseline"
    )  # the single RM reads every dev record


def test_the_gate_reads_held_records_when_given_not_the_dev_that_picked_the_epoch():
    """A correction that turns all 6 dev pairs right (p = 1/64, kept on dev alone) is dropped when the held
    gate records, which it turns wrong, decide; the dev agreement then is the start's."""
    agg, tracker, result = _corrected_on_dev(6)
    held_items, held = _flipping_dev(6)
    held = (held[0], held[1].flip(0), held[2], None)  # [K=2, N]: the correction is wrong on every held pair
    gate = tracker.gate(0.05, result, (held_items, held))
    assert gate == {"turned_right": 0, "turned_wrong": 6, "p": 1.0, "kept": False}
    assert agg.weight.tolist() == [1.0, 0.0] and result.best_dev_agreement == 0.0


def test_gated_phase1_tests_on_the_gate_records(tiny_backbone, monkeypatch):
    """With ``gate_items`` the sign test counts the pairs of those records only (early stopping reads dev)."""
    model = make_model(tiny_backbone)
    cache = TrunkCache()
    tok, n = model.tokenizer, model.max_length
    code = [encode_record(tok, r, n) for r in length_records(20, seed=1, category="code")]
    train_warm_start(model, code[:8], code[8:12], FAST, cache, progress=False)
    fast = dataclasses.replace(FAST, learning_rate=5e-2)
    gated = dict(progress=False, init_from=WARM_START, gate_alpha=0.5, gate_items=code[16:])
    seen, real = [], phases.sign_test_gate
    monkeypatch.setattr(
        phases, "sign_test_gate", lambda items, *a: seen.append(list(items)) or real(items, *a)
    )
    res = train_phase1(model, "code", code[:12], code[12:16], fast, cache, **gated)
    assert seen == [code[16:]] and res.gate["turned_right"] + res.gate["turned_wrong"] <= 4
    kept = res.gate["kept"]
    got, start = (score_items(model.bank, e, code, cache) for e in (rm_expert("code"), WARM_START))
    assert (got == start) is not kept


def test_the_report_names_every_gate_decision(tmp_path):
    """report.md lists each category's gates: pairs turned right / wrong, p and the decision."""
    from dmoerm.pipeline.report import write_report

    sizes = {c: {"phase1": 24, "labels": 2, "phase3": 24, "dev": 16, "test": 48} for c in ("code", "chat")}
    state = {
        "phase1/code": {"gate": {"turned_right": 6, "turned_wrong": 0, "p": 1 / 64, "kept": True}},
        "phase3/code": {"gate": {"turned_right": 2, "turned_wrong": 1, "p": 0.5, "kept": False}},
        "phase1/chat": {"best_dev_agreement": 0.5},  # ungated: no cell
    }
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "config.yaml").write_text("model: {backbone: tiny}\n")
    report = write_report(tmp_path).read_text()
    assert "| code | 6 / 0, p = 0.0156: kept | 2 / 1, p = 0.5: back to its start |" in report
    assert "| chat | - | - |" in report and "1 of 2 gates kept their change." in report
    (tmp_path / "state.json").write_text(json.dumps({"phase1/chat": {}}))
    assert "Sign-test gates" not in write_report(tmp_path).read_text()  # a run that gated nothing

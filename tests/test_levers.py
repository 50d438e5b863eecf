# ruff: noqa: F811  (tests take the imported `trained` fixture as an argument)
"""Issue 13's levers: one route per prompt, the residual aggregator's zero start, warm-started phase 1, the
label gate."""

from __future__ import annotations

import copy

import pytest
import torch

from dmoerm.aggregator import Aggregator
from dmoerm.data import Message
from dmoerm.encoding import encode_record
from dmoerm.model import RoutingConfig, load_model, rm_expert
from dmoerm.pipeline import run_pipeline
from dmoerm.training import phases
from dmoerm.training.loop import TrainResult
from dmoerm.training.phases import (
    WARM_START,
    AggregatorTrainConfig,
    train_phase1,
    train_phase3,
    train_warm_start,
)
from dmoerm.training.trunk_cache import TrunkCache, pad_states
from helpers import job_config, length_records
from test_dmoerm import (
    FAST,
    make_model,
    trained,  # noqa: F401  (the module-scoped fixture)
)


def _long_prompt_pairs(n: int):
    """Prompts longer than half the token limit, each with a short and a very long response: before the
    response-independent prompt window, the two responses saw different prompt tokens."""
    convs, short, long = [], [], []
    for i in range(n):
        words = "def add(a, b): return a + b fix the bug please " if i % 2 else "I am sorry today was sad "
        convs.append([Message("user", words * 8 + str(i))])
        short.append("ok")
        long.append("blah " * 80 + "the end")
    return convs, short, long


def test_chosen_and_rejected_never_route_apart(trained):
    model, _, _, _ = trained
    convs, short, long = _long_prompt_pairs(8)
    # Short and long responses land in different length buckets and batches; the route must not care.
    out = model.score(convs + convs, short + long, batch_size=3)
    for i in range(len(convs)):
        a, b = out[i], out[len(convs) + i]
        assert a.category == b.category
        assert a.category_probability == pytest.approx(b.category_probability, abs=1e-6)


def test_a_prompt_routes_the_same_in_any_batch(trained):
    model, _, _, _ = trained
    convs, short, long = _long_prompt_pairs(6)
    alone = [model.score([c], [r])[0] for c, r in zip(convs, long)]
    mixed = model.score(convs + convs, long + short, batch_size=4)[: len(convs)]
    for a, m in zip(alone, mixed):
        assert a.category == m.category
        assert a.category_probability == pytest.approx(m.category_probability, abs=1e-5)
        assert a.reward == pytest.approx(m.reward, abs=1e-5)


def test_labelled_category_scoring_sends_each_input_where_it_is_told(trained):
    """``dmoerm_outputs(categories=...)`` (the evaluation's "DMoERM, labelled category"): each input goes to
    the named category's inner model; where the router picked that category the reward is the routed one,
    and batched equals one input at a time."""
    from dmoerm.scoring import dmoerm_outputs, flatten

    model, _, recs, _ = trained
    cache = TrunkCache()
    flat, where = flatten([encode_record(model.tokenizer, r, model.max_length) for r in recs[:16]])
    routed = dmoerm_outputs(model, flat, cache)
    told = [r.category for r, w in zip(recs, where) for _ in range(w.start, w.stop)]
    sent = dmoerm_outputs(model, flat, cache, categories=told)
    assert sent.category == told
    same = [i for i, c in enumerate(told) if routed.category[i] == c]
    moved = [i for i, c in enumerate(told) if routed.category[i] != c]
    assert same and moved  # the tiny router is wrong on some: both cases are exercised
    assert torch.allclose(sent.reward[same], routed.reward[same], atol=1e-6)
    for i in moved[:4]:
        alone = dmoerm_outputs(model, [flat[i]], cache, categories=[told[i]])
        assert alone.reward[0].item() == pytest.approx(sent.reward[i].item(), abs=1e-6)
        assert alone.reward[0].item() != pytest.approx(routed.reward[i].item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"categories: nope not among the model's \("):
        dmoerm_outputs(model, flat[:1], cache, categories=["nope"])
    with pytest.raises(ValueError, match="categories: 2 given for 1 inputs"):
        dmoerm_outputs(model, flat[:1], cache, categories=["code", "code"])


@pytest.mark.parametrize("kind", ["residual", "linear"])
def test_residual_aggregator_starts_at_the_phase1_reward(trained, kind):
    """Both aggregators that start from the phase-1 reward score exactly as it before any training."""
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    names = [rm_expert("code")] + model.category_experts("code")
    model.aggregators["code"] = Aggregator(len(names), model.bank.hidden_size, kind=kind)
    model.aggregator_experts["code"] = names
    convs = [list(r.conversation) for r in recs[:6]]
    resps = [r.responses[1] for r in recs[:6]]
    full = model.score(convs, resps)
    model.routing = RoutingConfig(aggregation="phase1")
    phase1 = model.score(convs, resps)
    assert any(o.category == "code" for o in full)
    for f, p in zip(full, phase1):
        assert f.reward == pytest.approx(p.reward, abs=1e-6)
    agg = model.aggregators["code"]
    if kind == "linear":  # weight 1 on the phase-1 score, 0 on the others'
        assert agg.weight.tolist() == [1.0] + [0.0] * (len(names) - 1)
        return
    # The correction's first layers are random, its output layer zero: only training moves the reward.
    assert torch.count_nonzero(agg.mlp[0].weight) > 0 and torch.count_nonzero(agg.mlp[-1].weight) == 0


def test_residual_phase3_keeps_no_correction_unless_dev_improves(trained):
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    tok, n = model.tokenizer, model.max_length
    items = [encode_record(tok, r, n) for r in recs]
    cache = TrunkCache()
    config = AggregatorTrainConfig(epochs=3, aggregator="residual", learning_rate=1e-2)
    res = train_phase3(model, "code", items[20:36], items[36:40], config, cache)
    assert model.aggregator_experts["code"][0] == rm_expert("code")
    assert res.history["dev_step"][0] == 0  # "no correction" measured before the first step
    best = max(res.history["dev_agreement"])
    assert res.best_dev_agreement == best
    if res.history["dev_agreement"].index(best) == 0:  # nothing beat it: the reward is phase 1's exactly
        assert torch.count_nonzero(model.aggregators["code"].mlp[-1].weight) == 0


def test_residual_aggregator_saves_and_loads(trained, tmp_path):
    model, _, recs, _ = trained
    model = copy.deepcopy(model)
    items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
    config = AggregatorTrainConfig(epochs=2, aggregator="residual", early_stopping_patience=0)
    train_phase3(model, "code", items[20:36], [], config, TrunkCache())
    convs, resps = [list(r.conversation) for r in recs[:4]], [r.responses[0] for r in recs[:4]]
    before = model.score(convs, resps)
    model.save_pretrained(tmp_path / "m")
    after = load_model(tmp_path / "m").score(convs, resps)
    assert [a.reward for a in after] == pytest.approx([b.reward for b in before], abs=1e-6)


def test_bad_aggregator_name_is_named():
    with pytest.raises(ValueError, match="aggregator: 'gated' is not one of mlp, residual"):
        AggregatorTrainConfig(aggregator="gated")


def test_warm_started_phase1_starts_from_the_pooled_weights(tiny_backbone, monkeypatch):
    model = make_model(tiny_backbone)
    cache = TrunkCache()
    tok, n = model.tokenizer, model.max_length
    code = [encode_record(tok, r, n) for r in length_records(12, seed=0, category="code")]
    chat = [encode_record(tok, r, n) for r in length_records(12, seed=1, category="chat")]
    train_warm_start(model, code[:8] + chat[:8], code[8:] + chat[8:], FAST, cache, progress=False)
    pooled = {k: v.clone() for k, v in model.bank.heads[WARM_START].state_dict().items()}
    pooled_lora = {
        name.replace(f".{WARM_START}.", ".X."): p.detach().clone()
        for name, p in model.bank.peft_model.named_parameters()
        if f".{WARM_START}." in name
    }
    seen = {}

    def spy(
        bank,
        expert,
        train,
        dev,
        config,
        cache,
        checkpoint_dir=None,
        desc=None,
        evaluate_first=False,
        pending=None,
    ):
        seen["head"] = {k: v.clone() for k, v in bank.heads[expert].state_dict().items()}
        seen["lora"] = {
            name.replace(f".{expert}.", ".X."): p.detach().clone()
            for name, p in bank.peft_model.named_parameters()
            if f".{expert}." in name
        }
        seen["evaluate_first"] = evaluate_first
        return TrainResult()

    monkeypatch.setattr(phases, "train_expert", spy)
    train_phase1(model, "code", code[:8], code[8:], FAST, cache, progress=False, init_from=WARM_START)
    assert seen["evaluate_first"] is True
    assert all(torch.equal(seen["head"][k], v) for k, v in pooled.items())
    assert seen["lora"].keys() == pooled_lora.keys() and pooled_lora
    assert all(torch.equal(seen["lora"][k], v) for k, v in pooled_lora.items())


def test_pipeline_warm_start_and_label_gate(tmp_path, tiny_backbone):
    """Warm start trains once for every category; a capability with too few labels gets no expert, is out of
    its category's aggregator, the report says so, and the model still scores."""
    config = job_config(
        tmp_path,
        tiny_backbone,
        warm_start="phase1",
        baseline=False,
        labels={"source": "local", "judge": {"dtype": "float32", "progress": False}, "min_labels": 1},
        phase3={"epochs": 2, "batch_size": 8, "aggregator": "residual"},
    )
    run_pipeline(config, progress=False)
    out = tmp_path / "run"
    import json

    state = json.loads((out / "state.json").read_text())
    assert "warm_start" in state
    model = load_model(out / "model")
    # The tiny judge answers one position whatever the order: the strict rule (the default) keeps nothing.
    for c in ("code", "chat"):
        assert model.category_experts(c) == []
        assert model.aggregator_experts[c] == [rm_expert(c)]
        assert all(v == 0 for v in state[f"phase3/{c}"]["label_counts"].values())
    report = (out / "report.md").read_text()
    assert "too few labels: correctness (0), brevity (0)" in report
    out_scores = model.score([[Message("user", "def f(): pass")]], ["ok"])
    assert out_scores[0].category in ("code", "chat") and out_scores[0].reward == out_scores[0].reward


def test_warm_start_from_the_single_rm_imports_its_exact_weights(tmp_path, tiny_backbone):
    """``warm_start: baseline`` trains the single RM first and starts every phase 1 from a copy of it."""
    config = job_config(tmp_path, tiny_backbone, warm_start="baseline", labels={"source": "none"})
    run_pipeline(config, progress=False)
    out = tmp_path / "run"
    model, single = load_model(out / "model"), load_model(out / "baseline")
    convs = [[Message("user", f"def f(): pass #{i}")] for i in range(3)]
    resps = ["ok", "a longer answer here", "x"]
    want = [o.reward for o in single.score(convs, resps)]
    inputs = [model.encode(c, r) for c, r in zip(convs, resps)]
    s, mask = pad_states(TrunkCache().get(model.bank, inputs))
    with torch.no_grad():
        got = model.bank(s, mask, WARM_START).tolist()
    assert got == pytest.approx(want, abs=1e-5)


def test_warm_start_names_are_checked():
    from dmoerm.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="warm_start: 'yes' is not one of none, phase1, baseline"):
        PipelineConfig(warm_start="yes")
    with pytest.raises(ValueError, match="set baseline: true"):
        PipelineConfig(warm_start="baseline", baseline=False)


def test_a_damaged_model_file_is_named_when_loading(trained, tmp_path):
    model, _, _, _ = trained
    model.save_pretrained(tmp_path / "m")
    router = tmp_path / "m" / "router.safetensors"
    router.write_bytes(router.read_bytes()[:40])  # truncated, as a killed copy leaves it
    with pytest.raises(ValueError, match=r"damaged: .*router\.safetensors"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_training_file_is_named(tmp_path, tiny_backbone, text):
    config = job_config(tmp_path, tiny_backbone)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(text)
    config.data.sources = [str(empty)]
    with pytest.raises(ValueError, match=r"data.sources: .*empty\.jsonl: no preference records"):
        run_pipeline(config, progress=False)

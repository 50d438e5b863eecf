"""The length option (``length_penalty``): it keeps length out of every trained reward, is exactly the old loss
at 0, and is validated. Tiny random backbone; data where the longer response always wins (tests/helpers.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dmoerm.encoding import EncodedInput, RankedItem, encode_record
from dmoerm.evaluation import pearson
from dmoerm.experts import BackboneConfig
from dmoerm.model import new_dmoerm, rm_expert
from dmoerm.scoring import expert_states
from dmoerm.taxonomy import Capability, Category, Taxonomy
from dmoerm.training import loop, phases
from dmoerm.training.length import (
    fit_length_coefficient,
    length_correlation,
    length_correlation_penalty,
    length_feature,
    response_lengths,
)
from dmoerm.training.loop import TrainConfig, pair_agreement, ranking_loss, score_items
from dmoerm.training.phases import AggregatorTrainConfig, train_phase1, train_phase3
from dmoerm.training.trunk_cache import TrunkCache
from helpers import length_records, marker_records

TAXONOMY = Taxonomy(
    name="tiny",
    categories=(
        Category("code", "programming", (Capability("correctness", "is it right"),)),
        Category("chat", "talk", (Capability("empathy", "is it kind"),)),
    ),
)
PENALTY = 3.0
"""The weight the tests train with (length alone decides every label here, so the penalty must outweigh a
ranking loss that length alone can drive to 0)."""
THRESHOLD = 0.4
"""With the option on, |Pearson(reward, response tokens)| on held-out pairs must stay below this; without it the
same training reaches above 0.8 (about 0.93 with these seeds)."""


def _expert_config(length_penalty: float) -> TrainConfig:
    return TrainConfig(
        epochs=8, batch_size=8, learning_rate=5e-3, early_stopping_patience=0, length_penalty=length_penalty
    )


def _corr(rewards: list[list[float]], items) -> float:
    flat = [e for item in items for e in item.inputs]
    return pearson([x for r in rewards for x in r], response_lengths(flat).tolist())


@pytest.fixture(scope="module")
def trained(tiny_backbone, one_torch_thread):
    """Phase 1 twice on the same length-decided pairs (``code`` without, ``chat`` with the option)."""
    return _train(tiny_backbone)


def _train(tiny_backbone):
    torch.manual_seed(0)
    config = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    model = new_dmoerm(config, TAXONOMY, ["code", "chat"], init_lora_weights=False)
    tok, n = model.tokenizer, model.max_length
    train = [encode_record(tok, r, n) for r in length_records(32, seed=0)]
    test = [encode_record(tok, r, n) for r in length_records(32, seed=100)]
    cache = TrunkCache()
    for category, penalty in (("code", 0.0), ("chat", PENALTY)):
        torch.manual_seed(0)
        train_phase1(model, category, train, [], _expert_config(penalty), cache, progress=False)
    return model, train, test, cache


def test_expert_trained_with_the_option_correlates_with_length_far_less(trained):
    """train_expert (the single reward model and every phase-1/phase-2 expert) with and without the option."""
    model, _, test, cache = trained
    without = _corr(score_items(model.bank, rm_expert("code"), test, cache), test)
    with_option = _corr(score_items(model.bank, rm_expert("chat"), test, cache), test)
    assert without > 0.8, without
    assert abs(with_option) < THRESHOLD, with_option


def test_aggregator_trained_with_the_option_correlates_with_length_far_less(trained):
    """Phase 3 over a length-loving expert (trained without the option): the aggregator is kept off length."""
    model, train, test, cache = trained
    experts = [rm_expert("code")]
    flat = [e for item in test for e in item.inputs]
    feats = expert_states(model.bank, experts, flat, cache)
    corr = {}
    for penalty in (0.0, PENALTY):
        config = AggregatorTrainConfig(epochs=40, early_stopping_patience=0, length_penalty=penalty)
        train_phase3(model, "code", train, [], config, cache, experts=experts)
        with torch.no_grad():
            rewards = model.aggregators["code"](feats).tolist()
        corr[penalty] = pearson(rewards, response_lengths(flat).tolist())
    assert corr[0.0] > 0.8, corr
    assert abs(corr[PENALTY]) < THRESHOLD, corr


def test_zero_penalty_is_exactly_the_old_loss(trained, monkeypatch):
    """At 0 the penalty is never computed, so the loss is the ranking loss bit for bit (expert and aggregator)."""
    model, train, _, cache = trained

    def boom(*args, **kwargs):
        raise AssertionError("length_correlation called with length_penalty=0")

    monkeypatch.setattr(loop, "length_correlation_penalty", boom)
    monkeypatch.setattr(phases, "length_correlation_penalty", boom)
    items = train[:8]
    model.bank.add_expert("code__zero", init_from=rm_expert("code"))
    start = score_items(model.bank, "code__zero", items, cache)
    expected = ranking_loss(
        torch.tensor([x for r in start for x in r]),
        torch.tensor([(2 * k + b, 2 * k + w) for k, item in enumerate(items) for b, w in item.pairs]),
    )
    config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, early_stopping_patience=0)
    assert config.length_penalty == 0.0
    result = loop.train_expert(model.bank, "code__zero", items, [], config, cache)
    assert result.steps == 1  # one batch: its logged loss is the ranking loss of the starting weights
    assert result.history["loss"][0] == pytest.approx(expected.item(), abs=1e-6)
    train_phase3(
        model, "code", items, [], AggregatorTrainConfig(epochs=1), cache, experts=[rm_expert("code")]
    )


def test_loss_with_the_option_is_ranking_loss_plus_weighted_squared_correlation():
    rewards = torch.tensor([2.0, 0.5, 1.0, 1.5, -0.5, 0.0])
    lengths = torch.tensor([30.0, 10.0, 12.0, 40.0, 5.0, 25.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    pairs = torch.tensor([[0, 1], [3, 2], [5, 4]])
    # ungrouped: Pearson over the batch (up to the 1e-4 floor on the reward variance)
    r, n = rewards.numpy(), lengths.numpy()
    assert length_correlation(rewards, lengths).item() == pytest.approx(np.corrcoef(r, n)[0, 1], abs=1e-3)
    # grouped: each prompt's responses centred first (the within-prompt correlation)
    rc = r - np.repeat([r[0:2].mean(), r[2:4].mean(), r[4:6].mean()], 2)
    nc = n - np.repeat([n[0:2].mean(), n[2:4].mean(), n[4:6].mean()], 2)
    within = float(rc @ nc / math.sqrt((rc @ rc) * (nc @ nc)))
    assert length_correlation(rewards, lengths, groups).item() == pytest.approx(within, abs=1e-3)
    assert length_correlation_penalty(rewards, lengths).item() == pytest.approx(
        length_correlation(rewards, lengths).item() ** 2
    )
    # degenerate batches: no length variation, or fewer than 3 responses -> 0, with finite gradients
    flat = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    zero = length_correlation(flat, torch.full((3,), 7.0))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(flat.grad).all()
    assert length_correlation(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 5.0])).item() == 0.0
    const = torch.zeros(4, requires_grad=True)
    length_correlation_penalty(const, torch.tensor([1.0, 2.0, 3.0, 4.0])).backward()
    assert torch.isfinite(const.grad).all()
    # the training loss is the old ranking loss plus the weighted squared correlation
    base = ranking_loss(rewards, pairs)
    assert torch.isclose(
        base + 2.0 * length_correlation(rewards, lengths, groups) ** 2,
        base + 2.0 * length_correlation_penalty(rewards, lengths, groups),
    )


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "1", True])
@pytest.mark.parametrize("config", [TrainConfig, AggregatorTrainConfig])
def test_bad_length_penalty_names_the_field(config, bad):
    with pytest.raises(ValueError, match="length_penalty"):
        config(length_penalty=bad)


def test_length_penalty_defaults_off_and_accepts_numbers():
    assert TrainConfig().length_penalty == 0.0 and AggregatorTrainConfig().length_penalty == 0.0
    assert TrainConfig(length_penalty=1).length_penalty == 1
    assert AggregatorTrainConfig(length_penalty=0.5).length_penalty == 0.5


def _pair(better_tokens: int, worse_tokens: int, weight: float = 1.0) -> RankedItem:
    """One pair whose responses have these many tokens after a 3-token prompt."""
    better = EncodedInput(tuple(range(3 + better_tokens)), 3)
    worse = EncodedInput(tuple(range(3 + worse_tokens)), 3)
    return RankedItem((better, worse), ((0, 1),), weight)


def test_length_coefficient_is_the_length_only_models_fit():
    """Three pairs won by the answer twice as long, one by the half as long: sigmoid(beta log 2) = 3/4."""
    expected = math.log(3) / math.log(2)
    assert fit_length_coefficient([_pair(20, 10)] * 3 + [_pair(10, 20)]) == pytest.approx(expected, rel=1e-9)
    # item weights count as in the ranking loss: one pair at weight 1/3 against one at 1 is the same fit
    assert fit_length_coefficient([_pair(20, 10), _pair(10, 20, 1 / 3)]) == pytest.approx(expected, rel=1e-9)
    assert fit_length_coefficient([_pair(10, 10), _pair(7, 7)]) == 0.0  # no length difference, no fit
    assert fit_length_coefficient([]) == 0.0
    assert fit_length_coefficient([_pair(20, 10)] * 4) == 20.0  # separable: clipped, not infinite
    assert fit_length_coefficient([_pair(10, 20)] * 4) == -20.0


def test_covariate_loss_ranks_reward_plus_the_length_only_model(trained):
    """The first logged loss is the ranking loss of start reward + scale * beta * log tokens; scores stay the
    reward alone (the covariate is in the loss, not the model)."""
    model, train, _, cache = trained
    # two of eight pairs reversed, so the shorter answer wins those and beta is finite
    items = train[:6] + [RankedItem(item.inputs, ((1, 0),)) for item in train[6:8]]
    model.bank.add_expert("code__cov", init_from=rm_expert("chat"))
    start = torch.tensor([x for r in score_items(model.bank, "code__cov", items, cache) for x in r])
    lengths = response_lengths([e for item in items for e in item.inputs])
    beta = fit_length_coefficient(items)
    pairs = torch.tensor([(2 * k + b, 2 * k + w) for k, item in enumerate(items) for b, w in item.pairs])
    expected = ranking_loss(start + 1.5 * beta * length_feature(lengths), pairs)
    assert ranking_loss(start, pairs).item() != pytest.approx(expected.item(), abs=1e-3)  # the term matters
    config = TrainConfig(
        epochs=1, batch_size=8, learning_rate=1e-3, early_stopping_patience=0, length_covariate=1.5
    )
    result = loop.train_expert(model.bank, "code__cov", items, [], config, cache)
    assert result.steps == 1
    assert result.length_coefficient == pytest.approx(1.5 * beta)
    assert result.history["loss"][0] == pytest.approx(expected.item(), abs=1e-6)
    assert (
        loop.train_expert(model.bank, "code__cov", items, [], TrainConfig(epochs=1), cache).length_coefficient
        is None
    )


def test_aggregator_covariate_loss_ranks_its_reward_plus_the_length_only_model(trained):
    """Phase 3 (residual, so its reward starts as the phase-1 reward): the first logged loss is the ranking loss
    of that reward + scale * beta * log tokens, beta fitted on phase 3's own training pairs."""
    model, train, _, cache = trained
    items = train[:6] + [RankedItem(item.inputs, ((1, 0),)) for item in train[6:8]]
    start = torch.tensor([x for r in score_items(model.bank, rm_expert("chat"), items, cache) for x in r])
    lengths = response_lengths([e for item in items for e in item.inputs])
    beta = fit_length_coefficient(items)
    pairs = torch.tensor([(2 * k + b, 2 * k + w) for k, item in enumerate(items) for b, w in item.pairs])
    expected = ranking_loss(start + 2.0 * beta * length_feature(lengths), pairs)
    config = AggregatorTrainConfig(epochs=1, batch_size=16, aggregator="residual", length_covariate=2.0)
    result = train_phase3(model, "chat", items, [], config, cache, experts=[rm_expert("code")])
    assert result.length_coefficient == pytest.approx(2.0 * beta)
    assert result.history["loss"][0] == pytest.approx(expected.item(), rel=1e-5)
    plain = AggregatorTrainConfig(epochs=1)
    assert (
        train_phase3(model, "chat", items, [], plain, cache, experts=[rm_expert("code")]).length_coefficient
        is None
    )
    with pytest.raises(ValueError, match="length_covariate"):
        AggregatorTrainConfig(length_covariate=-0.5)


def _marker_model(tiny_backbone, seed: int, scale: float, cache: TrunkCache):
    """Phase 1 on 48 marker pairs (the longer answer wins 80% of them) with ``length_covariate=scale``;
    the model's agreement on 64 held-out pairs the shorter answer wins and its reward's correlation with
    response tokens on 64 held-out pairs where either wins."""
    torch.manual_seed(seed)
    config = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    model = new_dmoerm(config, TAXONOMY, ["code"], init_lora_weights=False)
    tok, n = model.tokenizer, model.max_length
    train = [encode_record(tok, r, n) for r in marker_records(48, seed=seed, longer_share=0.8)]
    shorter = [encode_record(tok, r, n) for r in marker_records(64, seed=100 + seed, longer_share=0.0)]
    either = [encode_record(tok, r, n) for r in marker_records(64, seed=200 + seed, longer_share=0.5)]
    cfg = TrainConfig(
        epochs=8, batch_size=8, learning_rate=5e-3, early_stopping_patience=0, length_covariate=scale
    )
    train_phase1(model, "code", train, [], cfg, cache, progress=False)
    expert = rm_expert("code")
    agreement = pair_agreement(shorter, score_items(model.bank, expert, shorter, cache))
    return agreement, _corr(score_items(model.bank, expert, either, cache), either)


def test_covariate_learns_less_length_and_no_less_of_what_length_does_not_tell(
    tiny_backbone, one_torch_thread
):
    """A first word decides every pair and the longer answer wins 80% of the training pairs. In each of three
    seeds the reward trained with the length-only model in its loss correlates less with length (0.48 against
    0.29 on average with these seeds), and on pairs the shorter answer wins it agrees no less on average."""
    cache = TrunkCache()  # one frozen trunk below the trained layers: its states serve every model here
    plain = [_marker_model(tiny_backbone, seed, 0.0, cache) for seed in range(3)]
    covariate = [_marker_model(tiny_backbone, seed, 1.0, cache) for seed in range(3)]
    for (_, corr_plain), (_, corr_cov) in zip(plain, covariate):
        assert corr_cov < corr_plain - 0.03, (plain, covariate)
    assert sum(a for a, _ in covariate) >= sum(a for a, _ in plain), (plain, covariate)


@pytest.mark.parametrize("value", [-1.0, float("inf"), "yes", True])
def test_length_covariate_must_be_a_number_at_least_zero(value):
    with pytest.raises(ValueError, match="length_covariate"):
        TrainConfig(length_covariate=value)


def test_length_covariate_is_a_stage_input_only_when_set():
    """Run folders recorded before the option resume (0 is left out of the inputs); any other value is a
    changed input of every stage that trains with it."""
    from dmoerm.pipeline import PipelineConfig
    from dmoerm.pipeline.state import stage_inputs

    plain = PipelineConfig()
    for stage in ("baseline", "phase1/code", "phase3/code"):
        assert not any(k.endswith("length_covariate") for k in stage_inputs(plain, stage)), stage
    covariate = PipelineConfig(phase1=TrainConfig(length_covariate=2.0))
    assert stage_inputs(covariate, "baseline")["phase1.length_covariate"] == 2.0
    assert stage_inputs(covariate, "phase1/code")["phase1.length_covariate"] == 2.0


def test_a_run_records_each_models_length_coefficient(tmp_path, tiny_backbone, one_torch_thread):
    """`dmoerm train` with ``phase1.length_covariate``: state.json keeps the coefficient the single RM's and
    every phase 1's loss added (the scale times the length-only fit on that model's training pairs)."""
    from dmoerm.pipeline import run_pipeline
    from helpers import job_config

    config = job_config(tmp_path, tiny_backbone, phase1={"epochs": 1, "length_covariate": 2.0})
    run_pipeline(config, progress=False)
    stages = json.loads((tmp_path / "run" / "state.json").read_text())
    assert isinstance(stages["baseline"]["length_coefficient"], float)
    phase1 = [info for stage, info in stages.items() if stage.startswith("phase1/")]
    assert phase1 and all(isinstance(info["length_coefficient"], float) for info in phase1)
    assert not any(
        "length_coefficient" in v.get("info", {}) for k, v in stages.items() if k.startswith("phase3/")
    )

"""The backbone's likelihood of a response as a term of DMoERM's reward (dmoerm.likelihood, issue 13)."""

from __future__ import annotations

import math

import pytest
import torch

from dmoerm.data import Message
from dmoerm.encoding import collate, encode, encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.likelihood import fit_likelihood_weights, fit_pair_weight, response_log_likelihood
from dmoerm.model import load_model, new_dmoerm
from dmoerm.pipeline.config import LikelihoodConfig
from dmoerm.scoring import dmoerm_outputs, response_likelihoods
from helpers import add_capability_experts, length_records, tiny_taxonomy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TAXONOMY = tiny_taxonomy()


def make_model(backbone: str):
    torch.manual_seed(0)
    config = BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    model = new_dmoerm(config, TAXONOMY, ["code", "chat"], init_lora_weights=False)  # non-zero LoRA
    add_capability_experts(model, TAXONOMY)
    return model


def chats(n: int = 4):
    convs = [[Message("user", f"question number {i} about the fox")] for i in range(n)]
    responses = ["the quick brown fox", "water boils at one hundred degrees here", "paris", "a b c d e f"][:n]
    return convs, responses


def reference_likelihood(backbone: str, model, conv, response) -> float:
    """The same quantity straight from transformers' LlamaForCausalLM: mean log p of the response tokens."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32).eval()
    e = encode(model.tokenizer, conv, response, model.max_length)
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1], -1)  # [T-1, V]
    targets = ids[0, 1:]
    picked = logp[torch.arange(len(targets)), targets][e.prompt_length - 1 :]
    return float(picked.mean())


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return make_model(tiny_backbone)


def test_likelihood_equals_the_causal_lms_own_log_probabilities(tiny_backbone, model):
    convs, responses = chats()
    inputs = [model.encode(c, r) for c, r in zip(convs, responses)]
    got = response_likelihoods(model.bank, inputs)  # [N], through the trunk, the bare top and the tied head
    want = torch.tensor([reference_likelihood(tiny_backbone, model, c, r) for c, r in zip(convs, responses)])
    assert torch.allclose(got, want, atol=1e-5)
    assert bool((got < 0).all())


def test_an_untied_lm_head_is_read_from_the_backbone_files(tmp_path):
    from conftest import build_tiny_backbone

    folder = build_tiny_backbone(tmp_path / "untied", tie_word_embeddings=False)
    untied = make_model(folder)
    convs, responses = chats(2)
    got = response_likelihoods(untied.bank, [untied.encode(c, r) for c, r in zip(convs, responses)])
    want = torch.tensor([reference_likelihood(folder, untied, c, r) for c, r in zip(convs, responses)])
    assert torch.allclose(got, want, atol=1e-5)


def test_likelihood_ignores_the_experts_and_its_batch(model):
    convs, responses = chats()
    inputs = [model.encode(c, r) for c, r in zip(convs, responses)]
    batch = collate(inputs, model.tokenizer.pad_token_id)
    states = model.bank.trunk(batch["input_ids"], batch["attention_mask"])
    together = response_log_likelihood(
        model.bank, states, batch["attention_mask"], batch["prompt_mask"], batch["input_ids"]
    )
    alone = torch.cat([response_likelihoods(model.bank, [x]) for x in inputs])
    assert torch.allclose(together, alone, atol=1e-5)
    # Non-zero LoRA experts exist and change the top layers' output; the term reads the base LM only.
    model.bank.peft_model.set_adapter(model.bank.expert_names[0])
    assert torch.equal(response_likelihoods(model.bank, inputs), response_likelihoods(model.bank, inputs))
    assert torch.allclose(response_likelihoods(model.bank, inputs), together, atol=1e-5)


def test_the_term_adds_exactly_weight_times_likelihood_to_each_reward(model, tmp_path):
    convs, responses = chats()
    inputs = [model.encode(c, r) for c, r in zip(convs, responses)]
    model.likelihood_weights = {}
    plain = dmoerm_outputs(model, inputs)
    like = response_likelihoods(model.bank, inputs)
    model.likelihood_weights = {"code": 0.5, "chat": -2.0}
    try:
        scored = dmoerm_outputs(model, inputs)
        w = torch.tensor([model.likelihood_weights[c] for c in plain.category])
        assert scored.category == plain.category
        assert torch.allclose(scored.reward, plain.reward + w * like, atol=1e-5)
        model.save_pretrained(tmp_path / "m")  # the weights are saved with the model
        assert torch.equal(dmoerm_outputs(load_model(tmp_path / "m"), inputs).reward, scored.reward)
        out = model.score(convs, responses)  # serving's path
        assert [o.reward for o in out] == pytest.approx(scored.reward.tolist(), abs=1e-5)
        batch = collate(inputs, model.tokenizer.pad_token_id)
        states = model.bank.trunk(batch["input_ids"], batch["attention_mask"])
        with pytest.raises(ValueError, match="weighs the backbone's likelihood .*needs input_ids"):
            model(states, batch["attention_mask"], batch["prompt_mask"])
    finally:
        model.likelihood_weights = {}


def test_fit_pair_weight_is_the_bradley_terry_optimum():
    # One feature, no offset: 3 of 4 pairs won by the higher feature at difference 1 -> weight log 3.
    d = torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert fit_pair_weight(d, torch.zeros(4), torch.ones(4), 20.0) == pytest.approx(math.log(3), abs=1e-9)
    # With offsets the fit is the weight where the gradient vanishes.
    o = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    d = torch.tensor([1.0, -0.5, 0.2, -2.0], dtype=torch.float64)
    g = fit_pair_weight(d, o, torch.ones(4), 20.0)
    assert float((d * (1 - torch.sigmoid(o + g * d))).sum()) == pytest.approx(0.0, abs=1e-9)
    # Separable pairs clip at the bound; no difference gives 0.
    assert fit_pair_weight(torch.tensor([1.0, 2.0]), torch.zeros(2), torch.ones(2), 7.0) == 7.0
    assert fit_pair_weight(torch.zeros(3), torch.ones(3), torch.ones(3), 7.0) == 0.0


def test_fitted_weights_maximise_the_dev_pairs_likelihood(model):
    items = [encode_record(model.tokenizer, r, model.max_length) for r in length_records(12, seed=3)]
    info = fit_likelihood_weights(model, items, None, "global", 10.0)
    try:
        (w,) = set(model.likelihood_weights.values())
        assert set(model.likelihood_weights) == {"code", "chat"}
        assert info["weights"] == {c: round(w, 6) for c in ("code", "chat")} and info["dev_pairs"] == 12
        assert info["dev_agreement"]["with"] >= info["dev_agreement"]["without"] - 1e-9

        def loglik(weight):  # the dev pairs' Bradley-Terry log-likelihood with the term at ``weight``
            model.likelihood_weights = {"code": weight, "chat": weight}
            s = dmoerm_outputs(model, [x for it in items for x in it.inputs]).reward.view(-1, 2)
            return float(torch.nn.functional.logsigmoid(s[:, 0] - s[:, 1]).sum())

        assert loglik(w) >= max(loglik(w - 0.05), loglik(w + 0.05), loglik(0.0)) - 1e-6
        per = fit_likelihood_weights(model, items, None, "category", 10.0)
        assert set(per["weights"]) == {"code", "chat"}
        assert fit_likelihood_weights(model, items, None, "none", 10.0) == {"fit": "none", "weights": {}}
        assert model.likelihood_weights == {}
    finally:
        model.likelihood_weights = {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fit": "dev"}, "fit: 'dev' is not one of none, global, category"),
        ({"max_weight": 0}, "max_weight: must be a finite number > 0, got 0"),
        ({"max_weight": "big"}, "max_weight: must be a number > 0, got 'big'"),
    ],
)
def test_bad_likelihood_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LikelihoodConfig(**kwargs)


def test_stage_inputs_of_the_likelihood_stage():
    from dmoerm.pipeline import PipelineConfig
    from dmoerm.pipeline.state import stage_inputs

    config = PipelineConfig(likelihood=LikelihoodConfig(fit="global"))
    inputs = stage_inputs(config, "likelihood")
    assert (
        inputs["likelihood.fit"] == "global" and "phase3.aggregator" in inputs and "phase1.epochs" in inputs
    )
    assert not any(k.startswith("likelihood.") for k in stage_inputs(config, "phase3/code"))


def check_likelihood_term_example(run, capsys) -> None:
    """examples/likelihood_term.py on a real run folder: its three systems, each split by length, on every pair."""
    import importlib.util
    from pathlib import Path

    from dmoerm.data import load_data

    path = Path(__file__).resolve().parents[1] / "examples" / "likelihood_term.py"
    spec = importlib.util.spec_from_file_location("likelihood_term", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main([str(run), "--trunk-cache-dir", str(run.parent / "cache"), "--resamples", "50"]) == 0
    out = capsys.readouterr().out
    pairs = sum(len(r.pairs()) for r in load_data(str(run / "splits" / "test.jsonl")))
    for name in ("the term alone", "single RM + term", "DMoERM"):
        assert f"  {name}: " in out and f"({pairs} pairs)" in out.split(f"  {name}: ")[1].splitlines()[0]
    assert "the single RM's, fitted alike" in out and out.count("shorter better: ") == 3


def test_a_run_fits_the_term_on_dev_and_a_changed_fit_is_a_changed_input(
    tmp_path, tiny_backbone, one_torch_thread, capsys
):
    import json

    from dmoerm.pipeline import run_pipeline
    from dmoerm.pipeline.state import RunStopped
    from helpers import job_config

    run_pipeline(job_config(tmp_path, tiny_backbone, likelihood={"fit": "global"}), progress=False)
    stages = json.loads((tmp_path / "run" / "state.json").read_text())
    info = stages["likelihood"]
    assert info["fit"] == "global" and info["dev_pairs"] > 0 and len(set(info["weights"].values())) == 1
    saved = load_model(tmp_path / "run" / "model").likelihood_weights
    assert {c: round(w, 6) for c, w in saved.items()} == info["weights"]
    check_likelihood_term_example(tmp_path / "run", capsys)
    with pytest.raises(
        RunStopped,
        match="stage likelihood finished with other inputs.*likelihood.fit: 'global' -> 'category'",
    ):
        run_pipeline(job_config(tmp_path, tiny_backbone, likelihood={"fit": "category"}), progress=False)
    run_pipeline(
        job_config(tmp_path, tiny_backbone, likelihood={"fit": "none"}, resume="restart"), progress=False
    )
    assert "likelihood" not in json.loads((tmp_path / "run" / "state.json").read_text())
    assert load_model(tmp_path / "run" / "model").likelihood_weights == {}

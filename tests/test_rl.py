"""The TRL-style reward function (in-process and over HTTP) and reward normalization."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dmoerm.data import Message
from dmoerm.rl import (
    NORMALIZATION_FILE,
    RewardNormalization,
    completion_text,
    compute_normalization,
    load_normalization,
    make_reward_fn,
    save_normalization,
    to_conversation,
)
from dmoerm.serving import ServeConfig, create_app
from test_serving import CONVERSATIONS, RESPONSES, ServerThread, TinyScorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorer(tiny_backbone) -> TinyScorer:
    return TinyScorer(tiny_backbone)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, scorer):
    """A 'model directory' holding a normalization measured on a reference set."""
    folder = tmp_path_factory.mktemp("reward_model")
    compute_normalization(
        scorer, CONVERSATIONS * 2, RESPONSES + [r[::-1] for r in RESPONSES], model_dir=folder
    )
    return folder


PLAIN_PROMPTS = ["What is the capital of France?", "Write a poem about spring."]
PLAIN_COMPLETIONS = ["Paris.", "Spring rain, green leaves."]
CONV_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about spring."}],
]
CONV_COMPLETIONS = [
    [{"role": "assistant", "content": "Paris."}],
    [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Spring rain, "}, {"type": "text", "text": "green leaves."}],
        }
    ],
]
TRL_EXTRAS = {  # what GRPOTrainer passes besides prompts and completions
    "completion_ids": [[1, 2], [3]],
    "trainer_state": None,
    "log_extra": lambda *a, **k: None,
    "log_metric": lambda *a, **k: None,
    "answer": ["x", "y"],
}


def raw_rewards(scorer, prompts, completions) -> list[float]:
    convs = [to_conversation(p) for p in prompts]
    return [o.reward for o in scorer.score(convs, [completion_text(c) for c in completions])]


# ----------------------------------------------------------------------------------------------------------
# Normalization


def test_compute_normalization_saves_json(scorer, model_dir):
    data = json.loads((model_dir / NORMALIZATION_FILE).read_text())
    rewards = [o.reward for o in scorer.score(CONVERSATIONS * 2, RESPONSES + [r[::-1] for r in RESPONSES])]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    assert data["mean"] == pytest.approx(mean, abs=1e-6)
    assert data["std"] == pytest.approx(std, rel=1e-5)
    assert data["count"] == 8 and data["format_version"] == 1
    assert [p.name for p in model_dir.iterdir()] == [NORMALIZATION_FILE]  # no temporary file left behind
    norm = load_normalization(model_dir)
    assert norm == RewardNormalization(data["mean"], data["std"], 8)
    assert norm.apply([mean + std]) == pytest.approx([1.0])


def test_compute_normalization_returns_without_saving(scorer):
    mean, std = compute_normalization(scorer, CONVERSATIONS, RESPONSES)
    assert math.isfinite(mean) and std > 0


def test_normalization_errors(scorer, tmp_path):
    with pytest.raises(ValueError, match="^conversations:"):
        compute_normalization(scorer, CONVERSATIONS[:1], RESPONSES[:1])
    with pytest.raises(ValueError, match="^conversations: all"):
        compute_normalization(scorer, [CONVERSATIONS[0]] * 3, [RESPONSES[0]] * 3)
    with pytest.raises(ValueError, match="^responses:"):
        compute_normalization(scorer, CONVERSATIONS, RESPONSES[:2])
    with pytest.raises(ValueError, match="^std:"):
        RewardNormalization(0.0, 0.0)
    assert load_normalization(tmp_path) is None
    (tmp_path / NORMALIZATION_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="malformed"):
        load_normalization(tmp_path)
    with pytest.raises(ValueError, match="^model_dir:"):
        save_normalization(tmp_path / "missing", RewardNormalization(0.0, 1.0))


def test_save_normalization_overwrites_atomically(tmp_path):
    save_normalization(tmp_path, RewardNormalization(1.0, 2.0, 3))
    save_normalization(tmp_path, RewardNormalization(4.0, 5.0, 6), note="second")
    data = json.loads((tmp_path / NORMALIZATION_FILE).read_text())
    assert (data["mean"], data["std"], data["count"], data["note"]) == (4.0, 5.0, 6, "second")
    assert len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------------------------------------
# Input conversion


def test_to_conversation_and_completion_text():
    assert to_conversation("hi") == [Message("user", "hi")]
    assert to_conversation(CONV_PROMPTS[1])[0] == Message("system", "Be brief.")
    assert completion_text("plain") == "plain"
    assert completion_text(CONV_COMPLETIONS[1]) == "Spring rain, green leaves."
    with pytest.raises(ValueError):
        to_conversation([{"role": "robot", "content": "x"}])


# ----------------------------------------------------------------------------------------------------------
# In-process reward function


def test_reward_fn_in_process_plain_and_conversational(scorer):
    fn = make_reward_fn(scorer, normalize=False)
    assert fn.__name__ == "dmoerm_reward"
    plain = fn(prompts=PLAIN_PROMPTS, completions=PLAIN_COMPLETIONS, **TRL_EXTRAS)
    conv = fn(prompts=CONV_PROMPTS, completions=CONV_COMPLETIONS, **TRL_EXTRAS)
    assert plain == pytest.approx(raw_rewards(scorer, PLAIN_PROMPTS, PLAIN_COMPLETIONS), abs=1e-6)
    assert conv == pytest.approx(raw_rewards(scorer, CONV_PROMPTS, CONV_COMPLETIONS), abs=1e-6)
    # A plain prompt is one user turn, so the plain and conversational forms of the first item agree.
    assert plain[0] == pytest.approx(conv[0], abs=1e-6)
    assert all(isinstance(r, float) for r in plain + conv)
    assert fn(prompts=[], completions=[]) == []
    with pytest.raises(ValueError, match="completions"):
        fn(prompts=PLAIN_PROMPTS, completions=PLAIN_COMPLETIONS[:1])


def test_reward_fn_concat_mode_scores_rendered_text(scorer):
    fn = make_reward_fn(scorer, normalize=False, plain_prompts="concat")
    prompts = [scorer.render(CONVERSATIONS[0], "")[: -len("<|im_end|>\n")]] * 2
    got = fn(prompts=prompts, completions=["Paris.", "Lyon."])
    assert got == pytest.approx(scorer.score_texts([prompts[0] + "Paris.", prompts[0] + "Lyon."]), abs=1e-6)


def test_reward_fn_applies_normalization(scorer, model_dir):
    norm = load_normalization(model_dir)
    raw = raw_rewards(scorer, CONV_PROMPTS, CONV_COMPLETIONS)
    fn = make_reward_fn(scorer, model_dir=model_dir)
    assert fn(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx(norm.apply(raw), abs=1e-6)
    off = make_reward_fn(scorer, model_dir=model_dir, normalize=False)
    assert off(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx(raw, abs=1e-6)
    explicit = make_reward_fn(scorer, normalization=(1.0, 2.0))
    assert explicit(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx([(r - 1.0) / 2.0 for r in raw], abs=1e-6)


def test_make_reward_fn_rejects_bad_arguments(scorer):
    with pytest.raises(ValueError, match="plain_prompts"):
        make_reward_fn(scorer, plain_prompts="zip")
    with pytest.raises(TypeError, match="scorer_or_url"):
        make_reward_fn(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_url"):
        make_reward_fn("localhost:8000")


# ----------------------------------------------------------------------------------------------------------
# Over HTTP


@pytest.fixture(scope="module")
def normalized_server(scorer, model_dir):
    with ServerThread(create_app(scorer, ServeConfig(model_dir=str(model_dir), max_wait_ms=1))) as srv:
        yield srv


def test_server_applies_normalization(normalized_server, scorer, model_dir):
    import httpx

    norm = load_normalization(model_dir)
    texts = [scorer.render(c, r) for c, r in zip(CONVERSATIONS, RESPONSES, strict=True)]
    raw = scorer.score_texts(texts)
    with httpx.Client(base_url=normalized_server.url) as c:
        got = c.post("/get_reward", json={"query": texts}).json()["rewards"]
        assert got == pytest.approx(norm.apply(raw), abs=1e-5)
        unnormalized = c.post("/get_reward", json={"query": texts, "normalize": False}).json()["rewards"]
        assert unnormalized == pytest.approx(raw, abs=1e-5)
        stats = c.get("/stats").json()
        assert stats["normalization"] == {"mean": norm.mean, "std": norm.std}


def test_server_normalization_can_be_disabled(scorer, model_dir):
    import httpx

    config = ServeConfig(model_dir=str(model_dir), normalize=False)
    with ServerThread(create_app(scorer, config)) as srv, httpx.Client(base_url=srv.url) as c:
        body = c.post("/get_reward", json={"query": ["some text"]}).json()
        assert body["rewards"] == pytest.approx(scorer.score_texts(["some text"]), abs=1e-5)


def test_reward_fn_over_http(normalized_server, scorer, model_dir):
    norm = load_normalization(model_dir)
    local = make_reward_fn(scorer, model_dir=model_dir)
    remote = make_reward_fn(normalized_server.url)
    for prompts, completions in ((PLAIN_PROMPTS, PLAIN_COMPLETIONS), (CONV_PROMPTS, CONV_COMPLETIONS)):
        got = remote(prompts=prompts, completions=completions, **TRL_EXTRAS)
        assert got == pytest.approx(local(prompts, completions), abs=1e-5)
        assert got == pytest.approx(norm.apply(raw_rewards(scorer, prompts, completions)), abs=1e-5)
    raw_remote = make_reward_fn(normalized_server.url, normalize=False)
    assert raw_remote(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx(
        raw_rewards(scorer, CONV_PROMPTS, CONV_COMPLETIONS), abs=1e-5
    )
    concat = make_reward_fn(normalized_server.url, plain_prompts="concat")
    texts = ["full text one", "full text two"]
    assert concat(["full text ", "full text "], ["one", "two"]) == pytest.approx(
        norm.apply(scorer.score_texts(texts)), abs=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# A real GRPOTrainer step with the reward function


def test_grpo_trainer_runs_one_step_with_reward_fn(tiny_backbone, scorer, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[int] = []
    inner = make_reward_fn(scorer, normalize=False)

    def reward(prompts, completions, **kwargs):
        calls.append(len(prompts))
        assert isinstance(prompts[0], list) and isinstance(completions[0], list)
        return inner(prompts, completions, **kwargs)

    reward.__name__ = "dmoerm_reward"
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    model = AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32)
    data = datasets.Dataset.from_list([{"prompt": p} for p in CONV_PROMPTS * 2])
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    assert calls and calls[0] == 4
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert logged and math.isfinite(logged[0]["reward"])
    assert any(k.startswith("rewards/dmoerm_reward") for k in logged[0])


def test_grpo_example_loads_either_kind_of_reward_model(tiny_backbone, tmp_path):
    """examples/grpo_example.py --reward-model takes a single RM or a DMoERM directory."""
    import importlib.util
    from pathlib import Path

    from dmoerm.experts import BackboneConfig
    from dmoerm.model import DMoERM, new_dmoerm, rm_expert
    from dmoerm.reward_model import RewardModel
    from helpers import tiny_taxonomy

    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_example.py"
    spec = importlib.util.spec_from_file_location("grpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    RewardModel.create(cfg).save_pretrained(tmp_path / "rm")
    dm = new_dmoerm(cfg, tiny_taxonomy(), ["code", "chat"])
    for c in dm.categories:
        dm.bank.add_expert(rm_expert(c))
    dm.save_pretrained(tmp_path / "dm")
    assert isinstance(example.load_scorer(str(tmp_path / "rm")), RewardModel)
    assert isinstance(example.load_scorer(str(tmp_path / "dm")), DMoERM)


# ----------------------------------------------------------------------------------------------------------
# verl custom reward function (dmoerm.rl.compute_score)

VERL_ITEMS = [  # (data_source, solution_str, ground_truth, extra_info) as verl's reward managers pass them
    (
        "openai/gsm8k",
        "Paris is the capital of France.",
        "Paris",
        {"prompt": "What is the capital of France?"},
    ),
    (
        "poems",
        "Spring rain, green leaves.",
        None,
        {
            "index": 3,
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Write a poem about spring."},
            ],
        },
    ),
    ("gsm8k", "Yes.", "42", {"split": "train", "question": "Is the sky blue?"}),  # verl's gsm8k example key
]


@pytest.fixture
def verl_reset():
    from dmoerm import rl
    from dmoerm.rl import verl

    yield rl
    rl.configure_verl(None)
    verl._verl_backends.clear()


def _verl_expected(scorer, norm=None):
    convs = [
        to_conversation(next(info[k] for k in ("prompt", "question") if k in info)) for *_, info in VERL_ITEMS
    ]
    raw = [o.reward for o in scorer.score(convs, [s for _, s, _, _ in VERL_ITEMS])]
    return norm.apply(raw) if norm is not None else raw


def test_verl_compute_score_in_process(scorer, verl_reset):
    rl = verl_reset
    rl.configure_verl(scorer)
    want = _verl_expected(scorer)
    # verl/experimental/reward_loop/reward_manager/naive.py lines 67-83: keyword arguments, and with a reward
    # model enabled also reward_router_address / reward_model_tokenizer (ignored here).
    got = [
        rl.compute_score(
            data_source=ds, solution_str=s, ground_truth=gt, extra_info=info, reward_router_address="x:1"
        )
        for ds, s, gt, info in VERL_ITEMS
    ]
    assert got == pytest.approx(want, abs=1e-5)
    assert rl.verl_reward_fn is rl.compute_score
    # verl/workers/reward_manager/batch.py lines 70-76: the batched keyword signature.
    batched = rl.compute_score_batch(
        data_sources=[x[0] for x in VERL_ITEMS],
        solution_strs=[x[1] for x in VERL_ITEMS],
        ground_truths=[x[2] for x in VERL_ITEMS],
        extra_infos=[x[3] for x in VERL_ITEMS],
    )
    assert batched == pytest.approx(want, abs=1e-5)


def test_verl_compute_score_over_http_with_details(normalized_server, scorer, model_dir, verl_reset):
    rl = verl_reset
    norm = load_normalization(model_dir)
    want = _verl_expected(scorer, norm)
    calls = len(scorer.calls)
    batched = rl.compute_score_batch(
        [x[0] for x in VERL_ITEMS],
        [x[1] for x in VERL_ITEMS],
        [x[2] for x in VERL_ITEMS],
        [x[3] for x in VERL_ITEMS],
        dmoerm_url=normalized_server.url,  # custom_reward_function.reward_kwargs
        dmoerm_details=True,
    )
    assert len(scorer.calls) == calls + 1  # one request, one scorer call for the batch
    assert [b["score"] for b in batched] == pytest.approx(want, abs=1e-5)
    # Numbers only, the same keys for every item (verl averages reward_extra_info in its metrics).
    assert {tuple(b) for b in batched} == {("score", "category_index", "category_probability")}
    assert all(b["category_probability"] == pytest.approx(0.75) for b in batched)
    single = rl.compute_score(
        "src", VERL_ITEMS[0][1], None, VERL_ITEMS[0][3], dmoerm_url=normalized_server.url
    )
    assert single == pytest.approx(want[0], abs=1e-5)


def test_verl_compute_score_env_and_errors(normalized_server, scorer, verl_reset, monkeypatch):
    rl = verl_reset
    monkeypatch.delenv("DMOERM_REWARD_URL", raising=False)
    monkeypatch.delenv("DMOERM_MODEL_DIR", raising=False)
    with pytest.raises(ValueError, match="DMOERM_REWARD_URL"):
        rl.compute_score("s", "answer", None, {"prompt": "q"})
    monkeypatch.setenv("DMOERM_REWARD_URL", normalized_server.url)
    assert math.isfinite(rl.compute_score("s", "answer", None, {"prompt": "q"}))
    with pytest.raises(
        ValueError, match=r"extra_info: no prompt under 'prompt', 'question'.*keys present: \['index'\]"
    ):
        rl.compute_score("s", "answer", None, {"index": 1})
    got = rl.compute_score("s", "answer", None, {"my_prompt": "q"}, dmoerm_prompt_key="my_prompt")
    assert got == pytest.approx(rl.compute_score("s", "answer", None, {"prompt": "q"}), abs=1e-6)

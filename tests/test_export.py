"""`dmoerm export`: plain transformers folders for single reward models, a remote-code folder for DMoERM.

Each export is loaded with transformers alone (plus trust_remote_code for DMoERM) and compared with dmoerm's own
rewards; then used by TRL's GRPOTrainer and RewardTrainer, transformers' text-classification pipeline and
reward-bench's default pipeline call.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dmoerm.aggregator import Aggregator
from dmoerm.cli import main
from dmoerm.data import Message
from dmoerm.encoding import encode
from dmoerm.experts import BackboneConfig
from dmoerm.export import export_model, load_float32_reward_model
from dmoerm.hf_modeling import encoded_inputs
from dmoerm.model import DMoERM, capability_expert_name, new_dmoerm, rm_expert
from dmoerm.reward_model import RewardModel
from dmoerm.rl import RewardNormalization, save_normalization
from helpers import tiny_taxonomy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "def add(a, b): return a - b  # fix the bug"}],
    [{"role": "user", "content": "I had a sad day, please talk to me."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And where does water boil?"},
    ],
    [{"role": "user", "content": "Write a poem about spring."}],
]
RESPONSES = [
    "def add(a, b):\n    return a + b",
    "I am sorry. Tell me more.",
    "At 100 degrees.",
    "Spring rain.",
]
MAX_LENGTH = 256  # every chat above fits: dmoerm truncates nothing


def messages(conversations=CONVERSATIONS):
    return [[Message(m["role"], m["content"]) for m in c] for c in conversations]


def chat_texts(tokenizer, conversations=CONVERSATIONS, responses=RESPONSES) -> list[str]:
    return [
        tokenizer.apply_chat_template(c + [{"role": "assistant", "content": r}], tokenize=False)
        for c, r in zip(conversations, responses)
    ]


def hf_rewards(model, tokenizer, padding_side: str = "right") -> torch.Tensor:
    """As TRL's GRPOTrainer scores: rendered chats, no special tokens added, padded batch, logits [B, 1]."""
    batch = tokenizer(
        chat_texts(tokenizer),
        return_tensors="pt",
        padding=True,
        padding_side=padding_side,
        add_special_tokens=False,
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (len(CONVERSATIONS), 1)
    return logits[:, 0]


def backbone_config(backbone, **kw) -> BackboneConfig:
    return BackboneConfig(backbone=backbone, num_top_layers=2, max_length=MAX_LENGTH, **kw)


# ------------------------------------------------------------------------------------------ single RM
@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_backbone) -> Path:
    """A single RM (random non-zero LoRA, bf16 trunk as trained by default) with a normalization, exported."""
    folder = tmp_path_factory.mktemp("export_single")
    torch.manual_seed(0)
    RewardModel.create(backbone_config(tiny_backbone), init_lora_weights=False).save_pretrained(folder / "rm")
    save_normalization(folder / "rm", RewardNormalization(mean=0.25, std=2.0, count=10))
    result = export_model(folder / "rm", folder / "hf")
    assert result.kind == "single" and result.max_abs_diff <= 1e-4
    assert result.normalization == {"mean": 0.25, "std": 2.0}
    return folder


def test_single_export_is_a_plain_transformers_model_with_dmoerms_rewards(single):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(single / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(single / "hf")
    assert type(model) is LlamaForSequenceClassification and model.dtype == torch.float32
    reference = load_float32_reward_model(single / "rm")
    # Whole rendered chats tokenize to exactly dmoerm's (prompt, response) encoding.
    for text, conv, resp in zip(chat_texts(tokenizer), messages(), RESPONSES):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == list(encode(reference.tokenizer, conv, resp, MAX_LENGTH).input_ids)
    expected = torch.tensor([o.reward for o in reference.score(messages(), RESPONSES)])
    torch.testing.assert_close(hf_rewards(model, tokenizer, "right"), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(hf_rewards(model, tokenizer, "left"), expected, atol=1e-4, rtol=0)
    # The bf16-trunk model dmoerm trains and serves is within bf16 rounding of the float32 export.
    served = torch.tensor(
        [o.reward for o in RewardModel.from_pretrained(single / "rm").score(messages(), RESPONSES)]
    )
    assert (served - expected).abs().max() < 0.05


def test_single_export_layout_head_pad_and_normalization(single, tiny_backbone):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    with safe_open(single / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "score.weight" in keys and "score.bias" not in keys
    assert not [k for k in keys if "lora" in k]
    config = AutoConfig.from_pretrained(single / "hf")
    assert config.num_labels == 1 and config.problem_type == "regression"
    assert (config.mean, config.std, config.value_head_prefix) == (0.25, 2.0, "score")
    assert (
        config.dmoerm_export["trained_trunk_dtype"] == "bfloat16"
        and config.dmoerm_export["max_length"] == MAX_LENGTH
    )
    tokenizer = AutoTokenizer.from_pretrained(single / "hf")
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_backbone).chat_template
    for text in chat_texts(tokenizer):
        assert config.pad_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]
    with safe_open(single / "hf" / "model.safetensors", "pt") as f:
        head = f.get_tensor("score.weight")
    torch.testing.assert_close(head, RewardModel.from_pretrained(single / "rm").bank.heads["reward"].weight)


def test_openrlhf_style_loading_reads_the_score_head_and_normalization(single):
    """The contract of OpenRLHF's get_llm_for_sequence_regression (openrlhf/models/model.py): the base model class
    from AutoModel's mapping, a bias-free Linear named ``config.value_head_prefix``, the value at the last position
    of the attention mask (left padding, as its serve_rm.py sets), ``(r - config.mean) / config.std``."""
    from torch import nn
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(single / "hf")
    base_class, prefix = AutoModel._model_mapping[type(config)], config.value_head_prefix

    class ValueHeadModel(base_class.__base__):
        def __init__(self, config):
            super().__init__(config)
            setattr(self, self.base_model_prefix, base_class(config))
            setattr(self, prefix, nn.Linear(config.hidden_size, 1, bias=False))
            self.post_init()

    model, info = ValueHeadModel.from_pretrained(single / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(single / "hf")
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, padding_side="left")
    mask = batch["attention_mask"]  # [B, T]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # [B, T]
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(
            batch["input_ids"], attention_mask=mask, position_ids=positions
        ).last_hidden_state  # [B, T, H]
        values = getattr(model, prefix)(hidden).squeeze(-1)  # [B, T]
    last = mask.size(1) - 1 - mask.fliplr().argmax(dim=1)  # [B]
    reward = values[torch.arange(len(last)), last]
    expected = torch.tensor(
        [o.reward for o in load_float32_reward_model(single / "rm").score(messages(), RESPONSES)]
    )
    torch.testing.assert_close(reward, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        (reward - config.mean) / config.std, (expected - 0.25) / 2.0, atol=1e-4, rtol=0
    )


@pytest.fixture(scope="module")
def eos_padded_backbone(tmp_path_factory, tiny_backbone) -> str:
    """The tiny backbone with SmolLM2's tokenizer setup (pad = eos) and a template that ends turns with eos."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("eos_pad_backbone")
    for f in Path(tiny_backbone).iterdir():
        shutil.copy2(f, folder / f.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = tokenizer.chat_template.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith(
        "<|im_end|>"
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_pad_token_never_occurs_in_chats_so_the_pooled_token_is_dmoerms(eos_padded_backbone, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    cfg = backbone_config(eos_padded_backbone, trunk_dtype="float32")
    RewardModel.create(cfg, init_lora_weights=False).save_pretrained(tmp_path / "rm")
    result = export_model(tmp_path / "rm", tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert result.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    expected = torch.tensor(
        [o.reward for o in load_float32_reward_model(tmp_path / "rm").score(messages(), RESPONSES)]
    )
    torch.testing.assert_close(hf_rewards(model, tokenizer), expected, atol=1e-4, rtol=0)
    # With pad = eos, transformers would read the token before the final eos: other rewards.
    model.config.pad_token_id = tokenizer.eos_token_id
    assert (hf_rewards(model, tokenizer) - expected).abs().min() > 1e-3


def test_full_finetune_single_rm_exports_its_trained_top_layers(tiny_backbone, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(2)
    rm = RewardModel.create(backbone_config(tiny_backbone, trunk_dtype="float32", finetune="full"))
    with torch.no_grad():
        for p in rm.bank.backbone.decoder.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    rm.save_pretrained(tmp_path / "rm")
    export_model(tmp_path / "rm", tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    expected = torch.tensor([o.reward for o in rm.score(messages(), RESPONSES)])
    got = hf_rewards(model, AutoTokenizer.from_pretrained(tmp_path / "hf"))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ DMoERM
def route_code_prompt_to_code(dm) -> None:
    """Set the router so the first (code) prompt goes to ``code`` and the others to ``chat``."""
    from dmoerm.encoding import collate

    batch = collate([dm.encode(c, r) for c, r in zip(messages(), RESPONSES)], dm.tokenizer.pad_token_id)
    states = dm.bank.trunk(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
    with torch.no_grad():
        normed = dm.router.norm(dm.router.features(states, batch["prompt_mask"]))  # [B, H]
        direction = normed[0] - normed[1:].mean(0)  # [H]
        middle = (normed[0] + normed[1:].mean(0)) / 2  # [H]
        sign = torch.tensor([1.0, -1.0]) if dm.categories == ["code", "chat"] else torch.tensor([-1.0, 1.0])
        dm.router.head.weight.copy_(10 * sign[:, None] * direction[None, :])  # [C, H]
        dm.router.head.bias.copy_(-10 * sign * (direction @ middle))  # [C]


@pytest.fixture(scope="module")
def dmoerm_export(tmp_path_factory, tiny_backbone) -> Path:
    """A tiny DMoERM (random router; code: two capability experts + MLP; chat: phase-1 RM alone), exported."""
    folder = tmp_path_factory.mktemp("export_dmoerm")
    torch.manual_seed(3)
    cfg = backbone_config(tiny_backbone, trunk_dtype="float32")
    dm = new_dmoerm(cfg, tiny_taxonomy(), ["code", "chat"], init_lora_weights=False)
    for category in dm.categories:
        dm.bank.add_expert(rm_expert(category))
    experts = [capability_expert_name("code", "correctness"), capability_expert_name("code", "brevity")]
    for name in experts:
        dm.bank.add_expert(name)
    dm.aggregator_experts["code"] = experts
    dm.aggregators["code"] = Aggregator(len(experts), dm.bank.hidden_size)
    route_code_prompt_to_code(dm)
    dm.likelihood_weights = {"code": 0.7, "chat": -1.3}  # the backbone's likelihood term travels too
    dm.save_pretrained(folder / "dm")
    save_normalization(folder / "dm", RewardNormalization(mean=-0.5, std=3.0, count=10))
    result = export_model(folder / "dm", folder / "hf")
    assert result.kind == "dmoerm" and result.max_abs_diff <= 1e-5
    assert result.normalization == {"mean": -0.5, "std": 3.0}
    return folder


def load_remote(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def test_dmoerm_export_loads_with_remote_code_and_equals_dmoerm_score(dmoerm_export):
    model, tokenizer = load_remote(dmoerm_export / "hf")
    assert type(model).__name__ == "DMoERMForSequenceClassification"
    assert json.loads((dmoerm_export / "hf" / "config.json").read_text())["auto_map"]
    native = DMoERM.from_pretrained(dmoerm_export / "dm")
    assert native.likelihood_weights == {"code": 0.7, "chat": -1.3}
    reference = native.score(messages(), RESPONSES)
    expected = torch.tensor([o.reward for o in reference])
    assert [o.category for o in reference] == [
        "code",
        "chat",
        "chat",
        "chat",
    ]  # both inner models are exercised
    torch.testing.assert_close(hf_rewards(model, tokenizer, "right"), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_rewards(model, tokenizer, "left"), expected, atol=1e-5, rtol=0)
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    out = model(**batch)
    assert [model.config.categories[i] for i in out.category_index.tolist()] == [
        o.category for o in reference
    ]
    torch.testing.assert_close(
        out.category_probability, torch.tensor([o.category_probability for o in reference])
    )


def test_response_start_is_found_from_the_last_assistant_header(dmoerm_export):
    model, tokenizer = load_remote(dmoerm_export / "hf")
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, padding_side="left")
    found = encoded_inputs(batch["input_ids"], batch["attention_mask"], model.config.assistant_header_ids)
    dm = model.dmoerm
    assert found == [dm.encode(c, r) for c, r in zip(messages(), RESPONSES)]  # multi-turn row included
    no_header = tokenizer(["just some text"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"row 0: the assistant header \(token ids"):
        model(**no_header)


def test_long_chats_are_truncated_as_dmoerm_truncates_them(dmoerm_export):
    model, tokenizer = load_remote(dmoerm_export / "hf")
    conversations = [
        [{"role": "user", "content": "def add(a, b): " * 40}],  # the prompt alone is over max_length
        [{"role": "user", "content": "Hello?"}],
    ]
    responses = ["Sure.", "spring rain " * 60]  # the response alone is over max_length
    texts = chat_texts(tokenizer, conversations, responses)
    assert min(len(tokenizer(t)["input_ids"]) for t in texts) > MAX_LENGTH
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    got = model(**batch).logits[:, 0]
    reference = model.dmoerm.score(messages(conversations), responses)
    torch.testing.assert_close(got, torch.tensor([o.reward for o in reference]), atol=1e-5, rtol=0)


def test_dmoerm_export_is_self_contained_when_moved(dmoerm_export, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(dmoerm_export / "hf", moved)
    backbone = json.loads((moved / "dmoerm" / "backbone_config.json").read_text())["backbone"]
    assert backbone == "backbone" and (moved / "dmoerm" / "backbone" / "model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # Plain-model loading options are accepted; the DMoERM keeps its trained dtypes.
    model = AutoModelForSequenceClassification.from_pretrained(
        moved, trust_remote_code=True, device_map="cpu", dtype=torch.float16
    )
    tokenizer = AutoTokenizer.from_pretrained(moved, trust_remote_code=True)
    assert (model.config.mean, model.config.std) == (-0.5, 3.0)
    expected = torch.tensor(
        [o.reward for o in DMoERM.from_pretrained(dmoerm_export / "dm").score(messages(), RESPONSES)]
    )
    torch.testing.assert_close(hf_rewards(model, tokenizer), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("kind", ["single", "dmoerm"])
def test_text_classification_pipeline_and_reward_bench_call_give_the_reward(kind, single, dmoerm_export):
    """transformers' pipeline (reward-bench's default path is a text-classification pipeline), and the exact call
    of reward-bench's RewardBenchPipeline (rewardbench/models/pipeline.py, v0.1.4: tokenizer(samples,
    truncation, max_length=2048, padding) after run_rm.py set padding_side="left", then model(**inputs).logits)."""
    from transformers import pipeline

    if kind == "single":
        folder = single / "hf"
        expected = [o.reward for o in load_float32_reward_model(single / "rm").score(messages(), RESPONSES)]
    else:
        folder = dmoerm_export / "hf"
        expected = [
            o.reward for o in DMoERM.from_pretrained(dmoerm_export / "dm").score(messages(), RESPONSES)
        ]
    pipe = pipeline("text-classification", model=str(folder), trust_remote_code=True, device="cpu")
    texts = chat_texts(pipe.tokenizer)
    got = [r["score"] for r in pipe(texts, batch_size=2)]  # problem_type "regression": raw logits, no sigmoid
    assert got == pytest.approx(expected, abs=1e-4)
    tokenizer = pipe.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, truncation=True, max_length=2048, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = pipe.model(**inputs).logits
    assert logits[:, 0].tolist() == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_export_help_and_refuses_a_non_empty_out(single, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0 and "--model" in capsys.readouterr().out
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["export", "--model", str(single / "rm"), "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    assert main(["export", "--model", str(tmp_path / "taken"), "--out", str(tmp_path / "new")]) == 2
    assert (
        main(["export", "--model", str(single / "rm"), "--out", str(tmp_path / "taken"), "--overwrite"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["kind"] == "single"
    assert not (tmp_path / "taken" / "x").exists() and (tmp_path / "taken" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]


# ------------------------------------------------------------------------------------------ TRL
def grpo_train(tiny_backbone, tmp_path, reward_funcs, model_init_kwargs=None) -> list[dict]:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32)
    data = datasets.Dataset.from_list([{"prompt": c} for c in CONVERSATIONS[:2] * 2])
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
        model_init_kwargs=model_init_kwargs,
    )
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tiny_backbone),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "reward" in h]


@pytest.mark.slow
def test_grpo_trainer_takes_the_exported_folder_as_reward_funcs(single, tiny_backbone, tmp_path):
    logged = grpo_train(tiny_backbone, tmp_path, str(single / "hf"))
    assert logged and math.isfinite(logged[0]["reward"])
    assert "rewards/hf/mean" in logged[0]


@pytest.mark.slow
def test_grpo_trainer_takes_the_remote_code_dmoerm_as_reward_funcs(dmoerm_export, tiny_backbone, tmp_path):
    model, _ = load_remote(dmoerm_export / "hf")
    calls = []
    forward = model.forward

    def counted(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(out.logits.shape)
        return out

    model.forward = counted
    logged = grpo_train(tiny_backbone, tmp_path, model)
    assert calls and calls[0] == (4, 1)
    assert logged and math.isfinite(logged[0]["reward"]) and "rewards/hf/mean" in logged[0]


@pytest.mark.slow
def test_grpo_trainer_loads_the_dmoerm_folder_by_name_with_trust_remote_code(
    dmoerm_export, tiny_backbone, tmp_path
):
    logged = grpo_train(tiny_backbone, tmp_path, str(dmoerm_export / "hf"), {"trust_remote_code": True})
    assert logged and math.isfinite(logged[0]["reward"]) and "rewards/hf/mean" in logged[0]


@pytest.mark.slow
def test_reward_trainer_trains_the_exported_folder_one_step(single, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from safetensors import safe_open

    rows = [
        {
            "prompt": c,
            "chosen": [{"role": "assistant", "content": r}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for c, r in zip(CONVERSATIONS, RESPONSES)
    ]
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "rm"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = trl.RewardTrainer(
        model=str(single / "hf"), args=args, train_dataset=datasets.Dataset.from_list(rows)
    )
    with safe_open(single / "hf" / "model.safetensors", "pt") as f:
        before = f.get_tensor("score.weight")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and math.isfinite(losses[0])
    assert not torch.equal(trainer.model.score.weight.detach().cpu(), before)

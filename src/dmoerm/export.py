"""Export dmoerm models as Hugging Face folders that RLHF tools load without dmoerm's own API.

* A **single reward model** becomes a plain ``AutoModelForSequenceClassification`` folder: the LoRA adapter merged
  into the base weights, ``num_labels = 1``, the value head under the name transformers gives the architecture's
  head (``score`` for Llama, Mistral, Qwen2, ...), a pad token that never occurs in a rendered chat (so
  transformers' "last token that is not the pad token" is dmoerm's last real token), the tokenizer and chat
  template, and ``mean``/``std`` in ``config.json`` where ``dmoerm normalize`` measured them (the keys OpenRLHF
  reads). Everything is float32: equal to dmoerm's rewards with a float32 trunk within 1e-4.
* A **DMoERM** becomes a ``trust_remote_code`` folder: ``modeling_dmoerm.py`` (a copy of
  :mod:`dmoerm.hf_modeling`), ``config.json`` with ``auto_map``, the tokenizer, and the DMoERM directory in
  ``dmoerm/`` with its backbone in ``dmoerm/backbone/`` (the folder is self-contained; it needs ``dmoerm``
  installed).

:func:`export_model` writes into a temporary folder next to the target and renames it when complete, then
checks the export against dmoerm's own scoring on a few chats (:func:`check_export`). See docs/export.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmoerm import __version__
from dmoerm.experts import ExpertBank
from dmoerm.reward_model import RewardModel, read_model_file

logger = logging.getLogger(__name__)

MODELING_FILE = "modeling_dmoerm.py"
"""Name of the modeling file inside an exported DMoERM folder."""
DMOERM_SUBFOLDER = "dmoerm"
"""Subfolder of an exported DMoERM folder that holds the DMoERM model directory."""
BACKBONE_SUBFOLDER = "backbone"
"""Subfolder of the DMoERM directory (inside an export) that holds its pretrained backbone."""
NEW_PAD_TOKEN = "<|dmoerm_pad|>"
"""Added (and the embeddings resized) only when every special token of the tokenizer occurs in chats."""
CHECK_TOLERANCE = 1e-4
"""Largest allowed |exported reward - dmoerm reward| on the check chats."""

CHECK_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a careful programmer."},
        {"role": "user", "content": "Fix the bug: def add(a, b): return a - b"},
        {"role": "assistant", "content": "Which language is it?"},
        {"role": "user", "content": "Python, please."},
    ],
    [{"role": "user", "content": "I had a sad day. Can we talk?"}],
]
"""Chats :func:`export_model` checks the export on (also used to find a pad token that never occurs in chats)."""
CHECK_RESPONSES = [
    "Paris.",
    "def add(a, b):\n    return a + b",
    "I am sorry to hear that. Of course, tell me what happened.",
]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely it matches dmoerm."""

    kind: str
    """``single`` (a plain sequence-classification folder) or ``dmoerm`` (a trust_remote_code folder)."""
    out_dir: str
    """The exported folder."""
    max_abs_diff: float | None
    """Largest |exported reward - dmoerm reward| on :data:`CHECK_CONVERSATIONS`; None when not checked."""
    pad_token: str
    """The tokenizer's pad token in the export."""
    normalization: dict | None = None
    """``{"mean", "std"}`` written to config.json, when ``dmoerm normalize`` measured them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Float32Bank(ExpertBank):
    """An ExpertBank whose trunk is float32: the export holds one dtype, and a bf16 trunk would lose precision."""

    def __init__(self, config, init_lora_weights: bool | str = True):
        super().__init__(dataclasses.replace(config, trunk_dtype="float32"), init_lora_weights)


def load_float32_reward_model(model_dir: str | Path) -> RewardModel:
    """A saved single reward model with its trunk in float32 (what its export is compared to)."""
    info = read_model_file(model_dir)
    if info["kind"] != "single":
        raise ValueError(f"{model_dir}: a {info['kind']} model, not a single reward model")
    return RewardModel(_Float32Bank.load(model_dir))


# --------------------------------------------------------------------------------------------- chat tokens
def _chat_token_ids(tokenizer) -> set[int]:
    ids: set[int] = set()
    for conv, resp in zip(CHECK_CONVERSATIONS, CHECK_RESPONSES):
        text = tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": resp}], tokenize=False)
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def choose_pad_token(tokenizer) -> str | None:
    """A token for padding that never occurs in a rendered chat and is not eos/bos; None when there is none.

    transformers' ``*ForSequenceClassification`` reads the last position whose id differs from ``pad_token_id``:
    with pad = eos (SmolLM2) a chat template that ends the response with eos would be read one token early.
    """
    in_chats = _chat_token_ids(tokenizer)
    ends = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    unk = tokenizer.unk_token
    with_role = [t for t in tokenizer.all_special_tokens if t != unk]  # eos, bos, pad, ...: conventional pads
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    for token in [tokenizer.pad_token, *with_role, unk, *added]:
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id not in in_chats and token_id not in ends:
            return token
    return None


def assistant_header_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts between the prompt and the response (the generation prompt).

    Measured on the tokens, as the prompt tokens without the generation prompt are a prefix of those with it.
    """
    conv = [{"role": "user", "content": "x"}]
    with_header = tokenizer(
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    without = tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    if with_header[: len(without)] != without or len(with_header) == len(without):
        raise ValueError(
            "the tokenizer's chat template has no assistant header (generation prompt) that starts the response; "
            "a DMoERM export needs it to find where the response starts from the tokens"
        )
    return with_header[len(without) :]


# --------------------------------------------------------------------------------------------- single RM
def _value_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head transformers built for this architecture (a Linear to 1 output, not in the base)."""
    heads = [
        (n, m)
        for n, m in model.named_children()
        if isinstance(m, nn.Linear) and m.out_features == 1 and n != model.base_model_prefix
    ]
    if len(heads) != 1:
        raise ValueError(
            f"{type(model).__name__}: cannot find its one classification head (found {[n for n, _ in heads]}); "
            "this architecture cannot be exported as a plain folder yet"
        )
    return heads[0]


def _export_single(model_dir: Path, out: Path) -> tuple[str, dict | None]:
    from transformers import AutoModelForSequenceClassification

    from dmoerm.rl import load_normalization

    rm = load_float32_reward_model(model_dir)
    bank, tokenizer = rm.bank, rm.tokenizer
    decoder = bank.peft_model.merge_and_unload() if bank.peft_model is not None else bank.backbone.model
    config = copy.deepcopy(decoder.config)
    config.num_labels = 1
    config.problem_type = "regression"  # the text-classification pipeline and vLLM's classify: no sigmoid
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    getattr(model, model.base_model_prefix).load_state_dict(decoder.state_dict())
    head_name, head = _value_head(model)
    with torch.no_grad():
        head.weight.copy_(bank.heads[RewardModel.EXPERT].weight)  # [1, H]
        if head.bias is not None:
            head.bias.zero_()  # dmoerm's heads have no bias (the pairwise loss cannot train one)
    pad = choose_pad_token(tokenizer)
    if pad is None:
        tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
        model.resize_token_embeddings(len(tokenizer))
        pad = NEW_PAD_TOKEN
    tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.value_head_prefix = head_name  # OpenRLHF reads this before its --value_head_prefix default
    model.config.dmoerm_export = _export_info(model_dir, "single")
    norm = load_normalization(model_dir)
    normalization = None
    if norm is not None:
        model.config.mean, model.config.std = norm.mean, norm.std  # OpenRLHF's normalize_reward reads these
        normalization = {"mean": norm.mean, "std": norm.std}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return pad, normalization


def _export_info(model_dir: Path, kind: str) -> dict:
    saved = json.loads((Path(model_dir) / "backbone_config.json").read_text())  # as trained, not as exported
    return {
        "kind": kind,
        "dmoerm_version": __version__,
        "source": str(Path(model_dir).resolve()),
        "max_length": saved["max_length"],
        "trained_trunk_dtype": saved["trunk_dtype"],
    }


# --------------------------------------------------------------------------------------------- DMoERM
def _backbone_folder(name: str) -> Path:
    from dmoerm.backbone import resolve_backbone

    path = resolve_backbone(name)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(path)
    )  # a hub id: its cached snapshot (HF_HUB_OFFLINE=1 uses the cache only)


def _export_dmoerm(model_dir: Path, out: Path) -> tuple[str, dict | None]:
    from dmoerm import hf_modeling
    from dmoerm.model import DMoERM
    from dmoerm.rl import load_normalization

    model = DMoERM.from_pretrained(model_dir)
    tokenizer = model.tokenizer
    header = assistant_header_ids(tokenizer)
    sub = out / DMOERM_SUBFOLDER
    shutil.copytree(model_dir, sub)
    shutil.copytree(_backbone_folder(model.bank.config.backbone), sub / BACKBONE_SUBFOLDER)
    backbone_config = json.loads((sub / "backbone_config.json").read_text())
    backbone_config["backbone"] = BACKBONE_SUBFOLDER  # relative: hf_modeling.load_dmoerm resolves it
    (sub / "backbone_config.json").write_text(json.dumps(backbone_config, indent=2))
    shutil.copy2(Path(hf_modeling.__file__), out / MODELING_FILE)
    config = hf_modeling.DMoERMConfig(
        dmoerm_subfolder=DMOERM_SUBFOLDER,
        assistant_header_ids=header,
        categories=model.categories,
        pad_token_id=tokenizer.pad_token_id,
        auto_map={
            "AutoConfig": f"{MODELING_FILE[:-3]}.DMoERMConfig",
            "AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.DMoERMForSequenceClassification",
        },
        architectures=["DMoERMForSequenceClassification"],
    )
    config.dmoerm_export = _export_info(model_dir, "dmoerm")
    norm = load_normalization(model_dir)
    normalization = None
    if norm is not None:  # the same keys as a single RM's export; the logits stay raw rewards
        config.mean, config.std = norm.mean, norm.std
        normalization = {"mean": norm.mean, "std": norm.std}
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer.pad_token, normalization


# --------------------------------------------------------------------------------------------- check
def exported_rewards(out_dir: str | Path, rows: Sequence[Sequence[int]]) -> list[float]:
    """Rewards of token-id rows from the exported folder through transformers alone: right-padded with the
    folder's pad token (as TRL's GRPOTrainer pads), ``logits[:, 0]``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pad = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True).pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True).eval()
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros_like(input_ids)  # [B, T]
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(list(row))
        attention_mask[i, : len(row)] = 1
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].tolist()


def check_export(model_dir: str | Path, out_dir: str | Path) -> float:
    """Largest |exported - dmoerm| reward on :data:`CHECK_CONVERSATIONS` (single RMs against a float32 trunk).

    Both read the tokens dmoerm encodes (truncated to the model's max_length), so the check holds for any
    max_length; that whole rendered chats tokenize to the same ids is tested in tests/test_export.py.
    """
    from dmoerm.data import Message
    from dmoerm.model import DMoERM

    kind = read_model_file(model_dir)["kind"]
    reference = (
        load_float32_reward_model(model_dir) if kind == "single" else DMoERM.from_pretrained(model_dir)
    )
    convs = [[Message(m["role"], m["content"]) for m in c] for c in CHECK_CONVERSATIONS]
    expected = [o.reward for o in reference.score(convs, CHECK_RESPONSES)]
    rows = [reference.encode(c, r).input_ids for c, r in zip(convs, CHECK_RESPONSES)]
    got = exported_rewards(out_dir, rows)
    return max(abs(a - b) for a, b in zip(expected, got))


def export_model(
    model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, check: bool = True
) -> ExportResult:
    """Export a dmoerm model directory (single reward model or DMoERM) as a Hugging Face folder ``out_dir``.

    ``out_dir`` must not exist (or be empty) unless ``overwrite``; it is written in a temporary folder and renamed
    when complete, so a crash leaves no half-written export. ``check`` scores :data:`CHECK_CONVERSATIONS` both
    ways and raises ValueError (removing the export) when they differ by more than :data:`CHECK_TOLERANCE`.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    kind = read_model_file(model_dir)["kind"]
    if kind not in ("single", "dmoerm"):
        raise ValueError(f"{model_dir}: unknown model kind {kind!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise ValueError(f"{out}: the export cannot go inside the model directory {model_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        target = tmp / "model"
        export = _export_single if kind == "single" else _export_dmoerm
        pad, normalization = export(model_dir, target)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        target.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = None
    if check:
        diff = check_export(model_dir, out)
        if not diff <= CHECK_TOLERANCE:
            shutil.rmtree(out, ignore_errors=True)
            raise ValueError(
                f"{model_dir}: the exported model's rewards differ from dmoerm's by {diff:.3g} "
                f"(> {CHECK_TOLERANCE}) on the check chats; nothing was exported"
            )
    logger.info("exported the %s model %s to %s (max |reward difference| %s)", kind, model_dir, out, diff)
    return ExportResult(kind, str(out), diff, pad, normalization)

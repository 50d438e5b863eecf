"""The single reward model: a pretrained backbone plus a value head (LoRA or full fine-tuning of the top layers).

It is the baseline that DMoERM must beat and the phase-1 model of each DMoERM category.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dmoerm import __version__
from dmoerm.data import Message
from dmoerm.encoding import EncodedInput, encode, encode_rendered
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.outputs import RewardOutput
from dmoerm.scoring import expert_rewards

MODEL_FILE = "dmoerm_model.json"
"""Marks a model directory and names its kind (``single`` or ``dmoerm``)."""


def write_model_file(directory: Path, kind: str, extra: dict | None = None) -> None:
    info = {"kind": kind, "dmoerm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    info.update(extra or {})
    (directory / MODEL_FILE).write_text(json.dumps(info, indent=2))


def read_model_file(directory: str | Path) -> dict:
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a dmoerm model directory (no {MODEL_FILE})")
    return json.loads(path.read_text())


class RewardModel(nn.Module):
    """Backbone + value head. ``score`` returns one :class:`RewardOutput` per (conversation, response)."""

    EXPERT = "reward"

    def __init__(self, bank: ExpertBank):
        super().__init__()
        self.bank = bank
        if self.EXPERT not in bank.heads:
            bank.add_expert(self.EXPERT)
        self.eval()

    @classmethod
    def create(cls, config: BackboneConfig, init_lora_weights: bool | str = True) -> RewardModel:
        """A fresh model on the pretrained backbone (random value head, LoRA initialised as PEFT does)."""
        return cls(ExpertBank(config, init_lora_weights=init_lora_weights))

    @property
    def tokenizer(self):
        return self.bank.tokenizer

    @property
    def max_length(self) -> int:
        return self.bank.config.max_length

    def encode(self, conversation: Sequence[Message], response: str) -> EncodedInput:
        return encode(self.tokenizer, conversation, response, self.max_length)

    def rewards(self, inputs: Sequence[EncodedInput], batch_size: int = 16) -> torch.Tensor:
        """Rewards of encoded inputs: [N]."""
        return expert_rewards(self.bank, self.EXPERT, inputs, batch_size=batch_size)

    def score(
        self, conversations: list[list[Message]], responses: list[str], batch_size: int = 16
    ) -> list[RewardOutput]:
        if len(conversations) != len(responses):
            raise ValueError(f"{len(conversations)} conversations for {len(responses)} responses")
        inputs = [self.encode(c, r) for c, r in zip(conversations, responses, strict=True)]
        return [RewardOutput(reward=float(r)) for r in self.rewards(inputs, batch_size)]

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """Rendered prompt+response strings -> rewards (:func:`~dmoerm.encoding.encode_rendered`: a chat scores
        as :meth:`score` scores it; over-long texts are refused)."""
        return self.rewards(encode_rendered(self.tokenizer, texts, self.max_length), batch_size).tolist()

    def save_pretrained(self, directory: str | Path) -> None:
        """Config JSON + adapter (PEFT layout) + value head, in safetensors."""
        directory = Path(directory)
        self.bank.save(directory)
        write_model_file(directory, "single")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RewardModel:
        info = read_model_file(directory)
        if info["kind"] != "single":
            raise ValueError(
                f"{directory}: a {info['kind']} model, not a single reward model; use dmoerm.load_model"
            )
        return cls(ExpertBank.load(directory))

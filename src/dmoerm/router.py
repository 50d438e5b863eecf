"""The outer, sparse layer: a classifier that sends each prompt to one category's inner model.

It reads the backbone's trunk, mean-pooled over the prompt's tokens. Because the prompt is an exact token
prefix of every (prompt, response) sequence and attention is causal, the router's features come for free
from the trunk states that the experts read anyway (the performance issue), and every response to one
prompt is routed the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from dmoerm.backbone import masked_mean


class Router(nn.Module):
    """Linear classification head over the categories, on mean-pooled trunk states of the prompt."""

    def __init__(self, hidden_size: int, categories: list[str]):
        super().__init__()
        if len(categories) < 1:
            raise ValueError("categories: the router needs at least one category")
        self.categories = list(categories)
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, len(categories))

    def features(self, trunk_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Trunk states [B, T, H] and prompt mask [B, T] -> prompt features [B, H] (float32)."""
        return masked_mean(trunk_states.float(), prompt_mask)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Prompt features [B, H] -> category logits [B, C] (cross-entropy is taken on these, no softmax)."""
        return self.head(self.norm(features))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] -> category probabilities [B, C]."""
        return self.forward(features).softmax(-1)

"""Phase 3's aggregator: an MLP over the concatenated last-token hidden states of a category's K experts."""

from __future__ import annotations

import torch
from torch import nn


class Aggregator(nn.Module):
    """Linear(K*H -> H), PReLU, Linear(H -> 1), as in the paper (Quan 2024, section 3.3)."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.mlp = nn.Sequential(
            nn.Linear(num_experts * hidden_size, hidden_size), nn.PReLU(), nn.Linear(hidden_size, 1)
        )

    def forward(self, expert_hidden: torch.Tensor) -> torch.Tensor:
        """Expert states [K, B, H] -> reward [B]."""
        k, b, h = expert_hidden.shape
        concat = expert_hidden.permute(1, 0, 2).reshape(b, k * h)  # [B, K*H], expert-major per row
        return self.mlp(concat).squeeze(-1)

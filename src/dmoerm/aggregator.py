"""Phase 3's aggregator: an MLP over the concatenated last-token hidden states of a category's K experts."""

from __future__ import annotations

import torch
from torch import nn

AGGREGATORS = ("mlp", "residual")
"""``mlp``: the paper's reward = MLP(expert states). ``residual``: reward = the category's phase-1 reward +
MLP(expert states), the MLP's output layer starting at zero, so at step 0 the inner model scores exactly as
its phase-1 reward model and training can only add a correction (issue 13: a million-weight MLP fitted on a
few dozen rankings otherwise replaces a working reward with noise)."""


class Aggregator(nn.Module):
    """Linear(K*H -> H), PReLU, Linear(H -> 1), as in the paper (Quan 2024, section 3.3).

    With ``residual`` the first expert is the category's phase-1 reward model and its reward is added to the
    MLP's output, whose last layer is initialised at zero."""

    def __init__(self, num_experts: int, hidden_size: int, residual: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.residual = residual
        self.mlp = nn.Sequential(
            nn.Linear(num_experts * hidden_size, hidden_size), nn.PReLU(), nn.Linear(hidden_size, 1)
        )
        if residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, expert_hidden: torch.Tensor, expert_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Expert states [K, B, H] (and, when residual, the experts' scalar scores [K, B]) -> reward [B]."""
        k, b, h = expert_hidden.shape
        concat = expert_hidden.permute(1, 0, 2).reshape(b, k * h)  # [B, K*H], expert-major per row
        correction = self.mlp(concat).squeeze(-1)  # [B]
        if not self.residual:
            return correction
        if expert_scores is None:
            raise ValueError(
                "a residual aggregator needs the experts' scores (the first is the phase-1 reward)"
            )
        return expert_scores[0].to(correction.dtype) + correction

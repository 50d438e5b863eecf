"""Phase 3's aggregator: an MLP over the concatenated last-token hidden states of a category's K experts."""

from __future__ import annotations

import torch
from torch import nn

AGGREGATORS = ("mlp", "residual", "linear")
"""``mlp``: the paper's reward = MLP(expert states). ``residual``: reward = the category's phase-1 reward +
MLP(expert states), the MLP's output layer starting at zero, so at step 0 the inner model scores exactly as
its phase-1 reward model and training can only add a correction (issue 13: a million-weight MLP fitted on a
few dozen rankings otherwise replaces a working reward with noise). ``linear``: reward = w . (the experts'
scalar scores), w starting at (1, 0, ..., 0), so it too starts at the phase-1 reward; K weights (as ArmoRM
combines its objectives' scores), which a few hundred rankings can fit. No bias: the pairwise loss cannot
see one."""


class Aggregator(nn.Module):
    """Linear(K*H -> H), PReLU, Linear(H -> 1), as in the paper (Quan 2024, section 3.3); or, for ``linear``,
    one weight per expert over the experts' scalar scores.

    With ``residual`` and ``linear`` the first expert is the category's phase-1 reward model and the
    aggregator starts as exactly its reward (``residual``: plus an MLP whose last layer is initialised at
    zero; ``linear``: weight 1 on its score, 0 on the others')."""

    def __init__(self, num_experts: int, hidden_size: int, kind: str = "mlp"):
        super().__init__()
        if kind not in AGGREGATORS:
            raise ValueError(f"aggregator kind: {kind!r} is not one of {', '.join(AGGREGATORS)}")
        self.num_experts = num_experts
        self.kind = kind
        if kind == "linear":
            self.weight = nn.Parameter(torch.zeros(num_experts))  # [K]
            with torch.no_grad():
                self.weight[0] = 1.0
            return
        self.mlp = nn.Sequential(
            nn.Linear(num_experts * hidden_size, hidden_size), nn.PReLU(), nn.Linear(hidden_size, 1)
        )
        if kind == "residual":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @property
    def residual(self) -> bool:
        """True when the aggregator starts at (and needs) the first expert's score."""
        return self.kind != "mlp"

    def forward(self, expert_hidden: torch.Tensor, expert_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Expert states [K, B, H] (and, unless ``mlp``, the experts' scalar scores [K, B]) -> reward [B]."""
        k, b, h = expert_hidden.shape
        if self.residual and expert_scores is None:
            raise ValueError(
                f"a {self.kind} aggregator needs the experts' scores (the first is the phase-1 reward)"
            )
        if self.kind == "linear":
            scores = expert_scores.to(self.weight.dtype)  # [K, B]
            return (self.weight[:, None] * scores).sum(0)  # [B]
        concat = expert_hidden.permute(1, 0, 2).reshape(b, k * h)  # [B, K*H], expert-major per row
        correction = self.mlp(concat).squeeze(-1)  # [B]
        if not self.residual:
            return correction
        return expert_scores[0].to(correction.dtype) + correction

"""Length in the training loss: two ways to keep a reward from ranking by response length.

* ``length_penalty`` (ODIN's correlation term): the squared within-prompt correlation of a batch's rewards
  with response tokens is added to the loss, so the reward is pushed to carry no length at all.
* ``length_covariate`` (product-of-experts debiasing): the loss sees ``reward + beta * log(tokens)``, with
  ``beta`` the length-only model fitted once on the training pairs, and the reward alone is scored. Pairs that
  length already explains then carry little gradient and those where the shorter answer wins carry most, so
  the reward learns what length does not tell, and may still use length where quality follows it.

Both live in the loss alone: the models, their ``forward`` and their saved files do not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dmoerm.encoding import EncodedInput, RankedItem
from dmoerm.likelihood import fit_pair_weight


def check_length_weight(value: float, field_name: str) -> None:
    """Raise ValueError naming ``field_name`` unless ``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name}: must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field_name}: must be a finite number >= 0, got {value}")


def response_lengths(inputs: Sequence[EncodedInput]) -> torch.Tensor:
    """Response length in tokens of each encoded input (tokens after the prompt, end marker included): [N]."""
    return torch.tensor([len(e.input_ids) - e.prompt_length for e in inputs], dtype=torch.float32)


# Keeping length out of the reward. Of the two methods the length-bias issue names, we use ODIN's
# correlation term (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", arXiv 2402.07319,
# whose quality head is trained with a Pearson-correlation-with-length penalty on each batch) without ODIN's
# second, length head. That head is dropped at inference anyway, and leaving it out means the models
# (ExpertBank, Aggregator), their forward passes and their saved files stay as they are: the option lives in
# the loss alone, works the same for every expert and the phase-3 aggregator, and costs one Pearson per batch.
# We square the correlation instead of ODIN's absolute value: within a batch of a few dozen responses the
# sample correlation is noisy (about 1/sqrt(N) even when the true one is 0), and |r| would push on that noise
# with full force around 0, while r^2 is smooth there and its expectation is minimised at a true 0.
def length_correlation(
    rewards: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Pearson correlation of rewards [N] with lengths [N], differentiable in rewards.

    With ``groups`` [N] (the item, i.e. prompt, of each response), rewards and lengths are first centred within
    their group, so the correlation is the within-prompt one (responses to different prompts are not compared).
    The reward variance has a floor of ``1e-4`` (a standard deviation of 0.01), so a nearly constant reward
    (e.g. a fresh value head) has a near-zero correlation instead of an exploding gradient. 0 when there are
    fewer than 3 responses or the lengths do not vary.
    """
    r = rewards.float()
    if r.numel() < 3:
        return r.sum() * 0.0  # keeps the graph (and the device) without moving anything
    n = lengths.to(r.device, torch.float32)
    if groups is None:
        r, n = r - r.mean(), n - n.mean()
    else:
        g = groups.to(r.device)
        size = torch.zeros(int(g.max()) + 1, device=r.device).index_add_(0, g, torch.ones_like(r))
        r = r - (torch.zeros_like(size).index_add(0, g, r) / size)[g]
        n = n - (torch.zeros_like(size).index_add_(0, g, n) / size)[g]
    den = torch.sqrt((r * r).mean() + 1e-4) * torch.sqrt((n * n).mean()).clamp(min=1e-6)
    return (r * n).mean() / den


def length_correlation_penalty(
    rewards: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """The length penalty: the squared :func:`length_correlation` of a batch's rewards with response lengths."""
    return length_correlation(rewards, lengths, groups) ** 2


# Product-of-experts debiasing (Clark et al. 2019, "Don't Take the Easy Way Out", arXiv 1909.03683; He et al.
# 2019, "Unlearn Dataset Bias", arXiv 1908.10763): a bias-only model is fitted first and its log-odds are
# added to the trained model's during training only. Here the bias-only model is Bradley-Terry on
# log(response tokens) with one weight and no intercept (a pair's two orders are the same pair), which is
# also how AlpacaEval's length-controlled win rate models length. Fitted once, before training, on the
# training pairs, so every rank of a data-parallel run computes the same beta and the loss stays a sum over
# pairs (no extra trained parameter, nothing to shard or save).
_MAX_COEFFICIENT = 20.0  # all pairs won by the longer answer would send the fit to infinity


def length_coefficient(items: Sequence[RankedItem], scale: float) -> float | None:
    """The coefficient on log tokens that ``length_covariate = scale`` adds in the loss: ``scale`` times the
    length-only fit on ``items`` (:func:`fit_length_coefficient`); None when ``scale`` is 0 (no covariate)."""
    return scale * fit_length_coefficient(items) if scale > 0 else None


def length_feature(lengths: torch.Tensor) -> torch.Tensor:
    """The covariate of responses of ``lengths`` tokens: log(tokens) [N] (every response has >= 1 token), in
    ``lengths``' floating dtype (float32 for integers)."""
    lengths = lengths if lengths.is_floating_point() else lengths.float()
    return torch.log(lengths.clamp(min=1.0))


def fit_length_coefficient(items: Sequence[RankedItem], steps: int = 50) -> float:
    """The length-only model's weight ``beta``: maximises the weighted sum over ``items``' untied pairs of
    log sigmoid(beta * (log tokens of the better - log tokens of the worse)), by Newton's method from 0.

    Each item weighs its ``weight`` spread over its pairs, as in the ranking loss. 0.0 when no pair's two
    responses differ in length; clipped to +-20 when every pair is won by the longer (or shorter) answer."""
    diffs, weights = [], []
    for item in items:
        feature = length_feature(response_lengths(item.inputs).double()).tolist()
        for better, worse in item.pairs:
            diffs.append(feature[better] - feature[worse])
            weights.append(item.weight / len(item.pairs))
    d = torch.tensor(diffs, dtype=torch.float64)
    return fit_pair_weight(
        d, torch.zeros_like(d), torch.tensor(weights, dtype=torch.float64), _MAX_COEFFICIENT, steps
    )

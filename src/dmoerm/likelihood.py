"""The backbone's own likelihood of a response: a reward term that needs no labels (issue 13).

A response's *likelihood* here is the mean log-probability of its tokens given the prompt under the backbone
language model itself (the frozen trunk, then the top layers with every adapter off, the final norm and the
LM head): ``mean_t log p(response_t | prompt, response_<t)``. It is a mean, not a sum, so it does not grow
with length. On RMB the better response is the *less* likely one in about 62% of pairs, and in about 65% of
those where the shorter answer is the better one (docs/likelihood.md): a stronger model's answer is more
specific than what a 135M model expects, a weaker model's more generic. A reward model whose value head sits
on one last-token state cannot compute it (it needs the LM head at every response position), so it is
information the reward does not have.

A DMoERM with ``likelihood_weights`` adds ``weight * likelihood`` to the reward of each row its category's
inner model scores. The weight is fitted on human rankings by :func:`fit_pair_weight` (one Bradley-Terry weight
with the model's own reward margins as offset), so with weight 0 the model scores exactly as without.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from dmoerm.backbone import resolve_backbone

BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""


def output_embeddings(bank) -> torch.Tensor:
    """The backbone's LM head weight [V, H] in float32, read once and kept on the bank (not a submodule, so it
    is neither trained nor saved): the input embeddings when the backbone ties them, else ``lm_head.weight``
    from the backbone folder's safetensors (the bank loads the bare decoder, which has no LM head)."""
    memo = getattr(bank, "_output_embeddings", None)
    if memo is not None:
        return memo
    decoder = bank.backbone.decoder
    if getattr(decoder.config, "tie_word_embeddings", False):
        weight = decoder.embed_tokens.weight.detach().float()
    else:
        weight = _lm_head_from_files(resolve_backbone(bank.config.backbone)).to(bank.device)
    bank._output_embeddings = weight
    return weight


def _lm_head_from_files(folder: str) -> torch.Tensor:
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
    files = (
        [root / weight_map["lm_head.weight"]]
        if "lm_head.weight" in weight_map
        else sorted(root.glob("*.safetensors"))
    )
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if "lm_head.weight" in f.keys():
                return f.get_tensor("lm_head.weight").float()
    raise ValueError(
        f"likelihood: the backbone in {folder} does not tie its embeddings and none of its safetensors files "
        "holds lm_head.weight, so its likelihood of a response cannot be computed; set likelihood_weights to {}"
    )


def response_log_likelihood(
    bank,
    trunk_states: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """Each row's mean log-probability of its response tokens under the backbone LM: [B] float32.

    trunk_states [B, T, H] and the masks [B, T] as :func:`~dmoerm.scoring.padded_states` gives them; input_ids
    [B, T] the same rows' tokens (right-padded). The top layers run with no adapter (PEFT's mixed batch with
    every row ``__base__``), so neither an expert nor training changes the term. A row whose response has no
    token after the prompt window scores 0. Inference only (PEFT refuses mixed batches in training mode).
    """
    from dmoerm.experts import _ROW_ADAPTERS

    if bank.peft_model is None:
        raise ValueError("likelihood: needs finetune='lora' (a fully fine-tuned top has no base LM left)")
    device = bank.device
    states, mask = trunk_states.to(device), attention_mask.to(device)
    ids, prompt = input_ids.to(device), prompt_mask.to(device).bool()
    with torch.no_grad():
        token = _ROW_ADAPTERS.set([BASE] * states.shape[0])
        try:
            hidden = bank.backbone.top(states, mask)  # [B, T, H] float32, final norm applied
        finally:
            _ROW_ADAPTERS.reset(token)
        weight = output_embeddings(bank)  # [V, H]
        # position t predicts token t + 1; a response token is real and not in the prompt
        targets = mask[:, 1:].bool() & ~prompt[:, 1:]  # [B, T-1]
        out = torch.zeros(states.shape[0], device=device)
        for row in range(states.shape[0]):  # one row's logits at a time: [n, V] instead of [B, T, V]
            where = targets[row].nonzero().squeeze(-1)  # [n] positions whose next token is the response's
            if where.numel() == 0:
                continue
            logits = hidden[row, where] @ weight.T  # [n, V]
            logp = torch.log_softmax(logits, -1).gather(-1, ids[row, where + 1].unsqueeze(-1))  # [n, 1]
            out[row] = logp.mean()
    return out


def fit_pair_weight(
    differences: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, bound: float, steps: int = 50
) -> float:
    """The weight ``g`` maximising sum_p weights_p * log sigmoid(offsets_p + g * differences_p) (pairs [P],
    better minus worse), by Newton's method from 0, clipped to +-``bound`` (separable pairs would send it to
    infinity). 0.0 when no difference is non-zero. With zero offsets this is a one-feature Bradley-Terry fit."""
    d, o, w = differences.double(), offsets.double(), weights.double()
    if d.numel() == 0 or not bool((d != 0).any()):
        return 0.0
    g = 0.0
    for _ in range(steps):
        p = torch.sigmoid(o + g * d)  # [P] the model's probability of the human's order
        grad = float((w * d * (1 - p)).sum())
        hess = float((w * d * d * p * (1 - p)).sum())
        if hess <= 1e-12 or not math.isfinite(grad):
            break
        step = grad / hess
        g = max(-bound, min(bound, g + step))
        if abs(step) < 1e-10 or abs(g) == bound:
            break
    return g


def fit_likelihood_weights(model, items: Sequence, cache, fit: str, bound: float) -> dict:
    """Fit ``model.likelihood_weights`` on ``items`` (encoded dev records, :class:`~dmoerm.encoding.RankedItem`)
    and set them: ``global``, one weight for every category; ``category``, one per category on the pairs
    routed to it (0 for a category no pair went to); ``none`` clears them.

    Each weight maximises sum_p w_p log sigmoid(margin_p + weight * likelihood margin_p) over the items'
    untied pairs (:func:`fit_pair_weight`), the margins being the model's own rewards without the term, routed
    as when it scores; item weights spread over their pairs as in the ranking loss. Returns what state.json
    records: the fit, the weights, the pairs, and agreement on them without and with the term."""
    from dmoerm.scoring import dmoerm_outputs, flatten, response_likelihoods

    model.likelihood_weights = {}
    if fit == "none":
        return {"fit": "none", "weights": {}}
    flat, where = flatten(items)
    scores = dmoerm_outputs(model, flat, cache)  # rewards without the term, routed
    feature = response_likelihoods(model.bank, flat, cache)  # [N]
    rows = []  # (category, reward margin, likelihood margin, pair weight)
    for item, span in zip(items, where):
        reward, like = scores.reward[span], feature[span]
        for better, worse in item.pairs:
            rows.append(
                (
                    scores.category[span.start],
                    float(reward[better] - reward[worse]),
                    float(like[better] - like[worse]),
                    item.weight / len(item.pairs),
                )
            )
    groups = {"*": rows} if fit == "global" else {c: [r for r in rows if r[0] == c] for c in model.categories}
    fitted = {}
    for name, group in groups.items():
        offsets, diffs, weights = (
            torch.tensor([r[i] for r in group], dtype=torch.float64) for i in (1, 2, 3)
        )
        fitted[name] = fit_pair_weight(diffs, offsets, weights, bound)
    model.likelihood_weights = {c: fitted["*" if fit == "global" else c] for c in model.categories}

    return {
        "fit": fit,
        "weights": {c: round(w, 6) for c, w in model.likelihood_weights.items()},
        "dev_pairs": len(rows),
        "dev_agreement": {
            "without": _agreement(rows, {}),
            "with": _agreement(rows, model.likelihood_weights),
        },
    }


def _agreement(rows: list[tuple], weights: dict[str, float]) -> float:
    """Weighted share of (category, reward margin, likelihood margin, weight) pairs that reward + the term
    ranks as the human did (ties count half)."""
    won = 0.0
    for category, margin, like, w in rows:
        s = margin + weights.get(category, 0.0) * like
        won += w * (1.0 if s > 0 else 0.5 if s == 0 else 0.0)
    return round(won / max(sum(r[3] for r in rows), 1e-12), 4)

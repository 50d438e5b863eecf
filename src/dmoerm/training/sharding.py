"""One expert's training under accelerate's FSDP2, with the expert bank itself never sharded.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a module in place: it swaps the module's class and its
parameters for ``DTensor`` shards and offers no public way back. The bank, though, is read whole on every rank
after training (the next expert, phase 3, evaluation, ``ExpertBank.save``), and dev scoring runs each rank's
own share of the dev items, whose numbers of batches may differ across ranks (FSDP's gathers inside a forward
are collectives). So :func:`prepare_sharded` hands accelerate a *training view* of the bank instead: a
structural copy of its modules that shares every tensor with it (no weight is copied), whose frozen weights
FSDP leaves alone (``ignored_modules``) and whose trainable weights (the expert's LoRA adapter and value head,
or with ``finetune: full`` its top layers) FSDP shards with their gradients and optimizer state. The bank
keeps its own whole, unsharded parameters; :class:`ShardedExpert` gathers the trained shards whole
(``DTensor.full_tensor``) and copies them into the bank for dev scoring, checkpoints and the end of the run.

Only FSDP2 wrapping the view as one unit is supported; :func:`check_sharding` names every accelerate setting
that is not (docs/scaling.md, "DeepSpeed ZeRO-2 / ZeRO-3 and FSDP").
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

_DOCS = "docs/scaling.md, 'DeepSpeed ZeRO-2 / ZeRO-3 and FSDP'"


def is_fsdp(accelerator) -> bool:
    """True when the accelerator runs FSDP (either version)."""
    return accelerator.distributed_type == "FSDP"  # a str enum: "FSDP", "DEEPSPEED", "MULTI_GPU", ...


def _wrap_policy_name(policy) -> str:
    func = getattr(policy, "func", policy)  # set_auto_wrap_policy turns it into a functools.partial
    name = getattr(func, "__name__", str(func))
    return {
        "transformer_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "size_based_auto_wrap_policy": "SIZE_BASED_WRAP",
    }.get(name, name)


def fsdp_problems(accelerator) -> list[str]:
    """The accelerate FSDP settings of this launch that expert training does not support, each naming its
    accelerate config key (empty when the launch is not FSDP or every setting is supported)."""
    if not is_fsdp(accelerator):
        return []
    plugin = accelerator.state.fsdp_plugin
    problems = []
    if plugin.fsdp_version != 2:
        problems.append(
            f"fsdp_version: {plugin.fsdp_version} is not supported, use 2 (FSDP1 leaves the module's own "
            "parameters as flat shards, and its full state dict crashed on the CPU here)"
        )
    if plugin.auto_wrap_policy is not None:
        problems.append(
            f"fsdp_auto_wrap_policy: {_wrap_policy_name(plugin.auto_wrap_policy)} is not supported, use NO_WRAP "
            "(the top layers run piecewise, outside each decoder layer's forward, where a per-layer unit's "
            "weights would still be shards)"
        )
    if plugin.cpu_ram_efficient_loading:
        problems.append(
            "fsdp_cpu_ram_efficient_loading: true is not supported, use false (it moves the model to the meta "
            "device, and the training view shares its frozen weights with the expert bank)"
        )
    if plugin.activation_checkpointing:
        problems.append("fsdp_activation_checkpointing: true is not supported, use false (not tested)")
    offload = plugin.cpu_offload  # FSDP2: OffloadPolicy (none) or CPUOffloadPolicy; FSDP1: CPUOffload(...)
    if type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False) is True:
        problems.append("fsdp_offload_params: true is not supported, use false (not tested)")
    if plugin.ignored_modules is not None:
        problems.append(
            "fsdp_ignored_modules: not supported (dmoerm sets FSDP's ignored modules itself: every frozen one)"
        )
    if accelerator.mixed_precision != "no":
        problems.append(
            f"mixed_precision: {accelerator.mixed_precision!r} in the accelerate config is not supported under "
            "FSDP, use 'no' (dmoerm's own train mixed_precision: bf16 autocasts the top layers)"
        )
    return problems


def check_sharding(accelerator) -> None:
    """Raise ValueError, before anything is prepared, when the launch would shard the expert bank in a way
    expert training cannot read back whole: DeepSpeed ZeRO-3, or an FSDP setting of :func:`fsdp_problems`.
    DDP, DeepSpeed ZeRO-2 and FSDP2 with one unit (``NO_WRAP``) pass."""
    kind = accelerator.distributed_type
    stage = getattr(accelerator.state.deepspeed_plugin, "zero_stage", None)
    if kind == "DEEPSPEED" and stage == 3:
        raise ValueError(
            "accelerate distributed_type DeepSpeed ZeRO-3: sharding the expert bank's weights is not supported "
            f"(the deepspeed package is not tested here; {_DOCS}); launch with DDP "
            "(configs/accelerate/ddp-1x8.yaml), DeepSpeed ZeRO-2 or FSDP2 (configs/accelerate/fsdp.yaml)"
        )
    problems = fsdp_problems(accelerator)
    if problems:
        raise ValueError(
            "accelerate distributed_type FSDP: unsupported settings for training the expert bank: "
            + "; ".join(problems)
            + f" ({_DOCS}; configs/accelerate/fsdp.yaml has the supported ones)"
        )


def training_view(bank: nn.Module) -> nn.Module:
    """A copy of ``bank``'s module structure sharing every parameter and buffer (and the tokenizer) with it:
    sharding the view's parameters replaces them on the view's modules only, and the bank keeps its own."""
    memo = {id(t): t for t in itertools.chain(bank.parameters(), bank.buffers())}
    tokenizer = getattr(bank, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    return copy.deepcopy(bank, memo)


def _frozen_modules(view: nn.Module) -> list[nn.Module]:
    """The view's modules with no trainable parameter anywhere below them: FSDP ignores their weights, which
    stay whole and shared with the bank (the trunk, the other experts, the top layers' base weights)."""
    trainable = {id(m) for m in view.modules() if any(p.requires_grad for p in m.parameters())}
    return [m for m in view.modules() if id(m) not in trainable and any(True for _ in m.parameters(False))]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (``DTensor``) parameter's whole value, gathered on every rank (a collective); any other
    tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class WholeOptimizerState:
    """An optimizer's state as one process's optimizer would have it (whole tensors, keyed by the position of
    each parameter in ``names``): what :class:`~dmoerm.training.checkpoint.Checkpoint` saves and loads, so a
    checkpoint is the same under FSDP2 and DDP. ``state_dict`` gathers (every rank calls it at once) and
    ``load_state_dict`` shards again (every rank with the same dict)."""

    def __init__(self, model: nn.Module, optimizer, names: Sequence[str]):
        self.model, self.names = model, list(names)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's
        self._state: dict | None = None

    def gather(self) -> WholeOptimizerState:
        """Gather the whole state now (a collective; rank 0 then saves it alone)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True)
        )
        index = {n: i for i, n in enumerate(self.names)}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        self._state = {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}
        return self

    def state_dict(self) -> dict:
        if self._state is None:
            raise RuntimeError("WholeOptimizerState.gather() must run on every rank before state_dict()")
        return self._state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        groups = [{**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]]
        full = {"state": {self.names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True)
        )


class ShardedExpert:
    """The FSDP2 side of one expert's training: the prepared training view, its sharded trainable parameters
    (what the optimizer steps and clipping sees) and the bank's own, whole ones."""

    def __init__(self, accelerator, bank: nn.Module, bank_params: Sequence[nn.Parameter], names, optimizer):
        self.bank_params, self.names = list(bank_params), list(names)
        view = training_view(bank)
        plugin = accelerator.state.fsdp_plugin
        plugin.ignored_modules = _frozen_modules(view)
        try:
            self.model, self.optimizer = accelerator.prepare(view, optimizer)
        finally:
            plugin.ignored_modules = None  # the user's (check_sharding allowed none)
        by_name = dict(self.model.named_parameters())
        self.params = [by_name[n] for n in self.names]  # [DTensor shards], in the bank's order

    def weights(self) -> list[torch.Tensor]:
        """Copies of the trained weights, whole on every rank (a collective)."""
        return [whole(p).detach().clone() for p in self.params]

    def to_bank(self) -> None:
        """Copy the trained weights, whole, into the bank's own parameters (a collective)."""
        with torch.no_grad():
            for mine, p in zip(self.bank_params, self.params, strict=True):
                mine.copy_(whole(p))

    def from_bank(self) -> None:
        """Shard the bank's own weights into the training view (after a checkpoint loaded them)."""
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for mine, p in zip(self.bank_params, self.params, strict=True):
                shard = distribute_tensor(mine.detach(), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())

    def whole_optimizer(self) -> WholeOptimizerState:
        return WholeOptimizerState(self.model, self.optimizer, self.names)

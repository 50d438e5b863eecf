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

Under DeepSpeed the engine wraps a training view too: ZeRO-1/2 (:class:`ZeroExpert`) steps the bank's own
parameters, which stay whole on every rank; ZeRO-3 (:class:`ZeroThreeExpert`) partitions copies of the
trained weights, gathered into the bank like FSDP2's shards. Checkpoints hold whole optimizer states under
every launch (:class:`WholeOptimizerState`, :class:`ZeroOptimizerState`, :class:`ZeroThreeOptimizerState`).

Only FSDP2 wrapping the view as one unit, and DeepSpeed configs leaving precision, the optimizer, the schedule
and offloading to dmoerm, are supported; :func:`check_sharding` names every accelerate setting and DeepSpeed
key that is not (docs/scaling.md, "DeepSpeed ZeRO-2 / ZeRO-3 and FSDP").
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


def is_deepspeed(accelerator) -> bool:
    """True when the accelerator runs DeepSpeed."""
    return accelerator.distributed_type == "DEEPSPEED"


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") not in (None, False, "auto")


def deepspeed_problems(accelerator) -> list[str]:
    """The DeepSpeed config keys of this launch that expert training does not support (empty when the launch
    is not DeepSpeed or every key is supported). ZeRO-3's init flag is reported by :func:`check_sharding`."""
    if not is_deepspeed(accelerator):
        return []
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    problems = []
    for key in ("fp16", "bf16"):
        if _enabled(ds.get(key)):
            problems.append(
                f"{key}.enabled: true is not supported (DeepSpeed would cast the whole expert bank, trunk "
                "included), use false (dmoerm's own train mixed_precision: bf16 autocasts the top layers)"
            )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"{key}: not supported (dmoerm builds its own AdamW and learning-rate schedule)")
    for key in ("offload_optimizer", "offload_param"):
        device = zero.get(key, {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if device not in (None, "none"):
            problems.append(
                f"zero_optimization.{key}.device: {device} is not supported, use none (not tested)"
            )
    return problems


def check_sharding(accelerator) -> None:
    """Raise ValueError, before anything is prepared, when the launch would shard the expert bank in a way
    expert training cannot read back whole: DeepSpeed ZeRO-3, a DeepSpeed key of :func:`deepspeed_problems`
    or an FSDP setting of :func:`fsdp_problems`. DDP, DeepSpeed ZeRO-1/2, ZeRO-3 with ``zero3_init_flag:
    false`` and FSDP2 with one unit (``NO_WRAP``) pass."""
    kind = accelerator.distributed_type
    plugin = accelerator.state.deepspeed_plugin
    stage = getattr(plugin, "zero_stage", None)
    if kind == "DEEPSPEED" and stage == 3 and getattr(plugin, "zero3_init_flag", False):
        raise ValueError(
            "accelerate distributed_type DeepSpeed ZeRO-3: sharding the expert bank's weights is not supported "
            "with zero3_init_flag: true (transformers would load the backbone already partitioned, and the "
            f"bank must stay whole on every rank; {_DOCS}); set zero3_init_flag: false, as "
            "configs/accelerate/deepspeed-zero3.yaml does (each expert's trained weights are partitioned when "
            "its run starts), or launch with DeepSpeed ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)"
        )
    problems = deepspeed_problems(accelerator)
    if problems:
        raise ValueError(
            "accelerate distributed_type DeepSpeed: unsupported DeepSpeed config keys for training the expert "
            f"bank: {'; '.join(problems)} ({_DOCS}; configs/accelerate/ds-zero2.json has the supported ones)"
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


class _GatheredState:
    """An optimizer state that ``gather()`` (a collective, every rank at once) assembles before
    ``state_dict()`` can hand it to a checkpoint."""

    _state: dict | None = None

    def state_dict(self) -> dict:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}.gather() must run on every rank before state_dict()")
        return self._state


class WholeOptimizerState(_GatheredState):
    """An optimizer's state as one process's optimizer would have it (whole tensors, keyed by the position of
    each parameter in ``names``): what :class:`~dmoerm.training.checkpoint.Checkpoint` saves and loads, so a
    checkpoint is the same under FSDP2 and DDP. ``state_dict`` gathers (every rank calls it at once) and
    ``load_state_dict`` shards again (every rank with the same dict)."""

    def __init__(self, model: nn.Module, optimizer, names: Sequence[str]):
        self.model, self.names = model, list(names)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's

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

    def release(self) -> None:
        """Nothing to release: the bank's parameters were never the view's shards."""


def deepspeed_settings(accelerator, config) -> dict:
    """The launch's DeepSpeed config for one expert's run: a copy whose ``auto`` (or absent) keys the run's
    train config (a :class:`~dmoerm.training.loop.TrainConfig`) fills: ``gradient_accumulation_steps``,
    ``gradient_clipping`` from ``max_grad_norm`` (0 is off in both), ``train_micro_batch_size_per_gpu`` (this
    rank's share of ``batch_size``) and ``train_batch_size``.
    A value set in the JSON that differs from the train config raises ValueError naming both (DeepSpeed
    accumulates and clips by its config, and would silently train otherwise)."""
    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    world = accelerator.num_processes
    problems = []
    for key, field_name in (
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("gradient_clipping", "max_grad_norm"),
    ):
        ours = getattr(config, field_name)
        value = ds.get(key, "auto")
        if value == "auto":
            ds[key] = ours
        elif float(value) != float(ours):
            problems.append(
                f"{key}: {value} in the DeepSpeed config differs from the train config's {field_name} {ours} "
                "(set it to auto: dmoerm fills it from each stage's train config)"
            )
    if problems:
        raise ValueError(f"accelerate distributed_type DeepSpeed: {'; '.join(problems)} ({_DOCS})")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = max(1, -(-config.batch_size // world))
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
        )
    return ds


class ZeroOptimizerState(_GatheredState):
    """A DeepSpeed ZeRO-1/2 optimizer's state as one process's AdamW would have it (whole ``exp_avg`` /
    ``exp_avg_sq`` per parameter, keyed by its position in ``params``), so a checkpoint is the same as under
    DDP and FSDP2. ZeRO keeps each rank's partition of the flattened trainable weights (an fp32 master copy)
    and its AdamW moments; ``gather`` assembles them (a collective, every rank at once) and
    ``load_state_dict`` cuts this rank's partition out again."""

    def __init__(self, zero_optimizer, params: Sequence[nn.Parameter]):
        self.zero, self.params = zero_optimizer, list(params)
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _groups(self):
        """(flat fp32 partition, its AdamW state, the parameters flattened into it) of each param group."""
        base = self.zero.optimizer  # the torch AdamW, stepping the flat partitions
        for g, group in enumerate(self.zero.bit16_groups):
            flat = self.zero.single_partition_of_fp32_groups[g]
            yield g, flat, base.state[flat], group

    @staticmethod
    def _fragments(p: nn.Parameter):
        """(this rank's slice of ``p`` flattened, the same slice's place in the flat partition), or None."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        return (lp.start, lp.numel), (hp.start, hp.numel)

    def gather(self) -> ZeroOptimizerState:
        import torch.distributed as dist

        state: dict[int, dict] = {}
        for g, flat, flat_state, group in self._groups():
            moments = sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape)
            for p in group:
                entry = {
                    k: v.clone() if torch.is_tensor(v) else v
                    for k, v in flat_state.items()
                    if k not in moments
                }
                for key in moments:
                    whole_value = torch.zeros(p.numel(), dtype=flat.dtype, device=flat.device)  # [numel]
                    where = self._fragments(p)
                    if where is not None:
                        (lp_start, n), (hp_start, _) = where
                        whole_value[lp_start : lp_start + n] = flat_state[key][hp_start : hp_start + n]
                    dist.all_reduce(whole_value, group=self.zero.real_dp_process_group[g])  # one rank each
                    entry[key] = whole_value.view_as(p)
                state[self._index[id(p)]] = entry
        groups = [
            {**{k: v for k, v in pg.items() if k != "params"}, "params": [self._index[id(p)] for p in group]}
            for pg, group in zip(self.zero.optimizer.param_groups, self.zero.bit16_groups, strict=True)
        ]
        self._state = {"state": state, "param_groups": groups}
        return self

    def load_state_dict(self, state: dict) -> None:
        saved = {int(i): entry for i, entry in state["state"].items()}
        for pg, group in zip(self.zero.optimizer.param_groups, state["param_groups"], strict=True):
            pg.update({k: v for k, v in group.items() if k != "params"})  # lr, betas, initial_lr, ...
        for _, flat, flat_state, group in self._groups():
            entries = [saved.get(self._index[id(p)], {}) for p in group]
            if not entries[0]:
                continue
            for key, value in entries[0].items():
                if not (torch.is_tensor(value) and value.shape == group[0].shape):
                    flat_state[key] = value.clone() if torch.is_tensor(value) else value  # the step count
                    continue
                part = torch.zeros_like(flat)  # [partition numel]
                for p, entry in zip(group, entries, strict=True):
                    where = self._fragments(p)
                    if where is not None:
                        (lp_start, n), (hp_start, _) = where
                        part[hp_start : hp_start + n] = entry[key].flatten()[lp_start : lp_start + n]
                flat_state[key] = part


class ZeroExpert:
    """The DeepSpeed ZeRO-1/2 side of one expert's training. The engine wraps a training view of the bank
    (:func:`training_view`: DeepSpeed hooks the module it wraps, and those hooks must not stay on the bank),
    whose parameters are the bank's own; ZeRO shards the gradients and AdamW state but gathers the updated
    weights back into every rank's parameters after each step, so the bank is whole throughout."""

    def __init__(self, accelerator, bank: nn.Module, bank_params, names, optimizer, settings: dict):
        self.bank_params, self.names = list(bank_params), list(names)
        self.params = self.bank_params  # what clipping sees (DeepSpeed clips by its config instead)
        self.model, self.optimizer = _prepare_with(accelerator, settings, training_view(bank), optimizer)
        self.zero = self.optimizer.optimizer  # DeepSpeedZeroOptimizer inside accelerate's wrapper

    def weights(self) -> list[torch.Tensor]:
        """Copies of the trained weights (whole on every rank: no collective)."""
        return [p.detach().clone() for p in self.bank_params]

    def to_bank(self) -> None:
        """Nothing to copy: the engine steps the bank's own parameters."""

    def from_bank(self) -> None:
        """After a checkpoint loaded the bank's weights: this rank's slice of them into ZeRO's fp32 master
        partition (which the next step updates and gathers back)."""
        with torch.no_grad():
            for p in self.bank_params:
                where = ZeroOptimizerState._fragments(p)
                if where is not None:
                    (lp_start, n), _ = where
                    p._hp_mapping.hp_fragment.copy_(p.detach().flatten()[lp_start : lp_start + n])

    def whole_optimizer(self) -> ZeroOptimizerState:
        return ZeroOptimizerState(self.zero, self.bank_params)

    def release(self) -> None:
        """At the end of the run: the bank's parameters get tensors of their own again (ZeRO made them views
        of one flat buffer of the engine's, which safetensors refuses to save and which would keep it alive)."""
        with torch.no_grad():
            for p in self.bank_params:
                p.data = p.data.clone()


def zero_expert(accelerator, bank: nn.Module, bank_params, names, optimizer, settings: dict):
    """The DeepSpeed side of one expert's run: :class:`ZeroThreeExpert` under ZeRO-3, else :class:`ZeroExpert`."""
    stage = settings.get("zero_optimization", {}).get("stage", 0)
    kind = ZeroThreeExpert if stage == 3 else ZeroExpert
    return kind(accelerator, bank, bank_params, names, optimizer, settings)


def _prepare_with(accelerator, settings: dict, model: nn.Module, optimizer):
    """``accelerator.prepare(model, optimizer)`` under the run's DeepSpeed ``settings``."""
    stale = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if stale is not None:  # an earlier run stopped by an exception before free_memory: its engine is dead
        stale.engine.destroy()
        accelerator.deepspeed_engine_wrapped = None  # else backward would still go to it
    plugin = accelerator.state.deepspeed_plugin
    launch = plugin.deepspeed_config  # the same dict as plugin.hf_ds_config.config, which prepare fills
    plugin.deepspeed_config = plugin.hf_ds_config.config = settings
    try:
        return accelerator.prepare(model, optimizer)
    finally:
        plugin.deepspeed_config = plugin.hf_ds_config.config = launch  # the next run fills its own copy


def _zero3_view(bank: nn.Module, trainable: Sequence[nn.Parameter]) -> tuple[nn.Module, list[nn.Parameter]]:
    """A training view for ZeRO-3, which partitions every parameter of the module it wraps, in place: the
    trained weights are copies of their own (the bank keeps its whole ones), every frozen one a
    non-persistent buffer sharing the bank's tensor (ZeRO-3 partitions parameters only). Returns the view and
    its copies of ``trainable``, in order."""
    view = training_view(bank)
    own: dict[int, nn.Parameter] = {}
    for module in view.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            del module._parameters[name]
            if p.requires_grad:
                own.setdefault(id(p), nn.Parameter(p.detach().clone()))  # one copy for a tied weight
                module._parameters[name] = own[id(p)]
            else:
                module.register_buffer(name, p.detach(), persistent=False)
    return view, [own[id(p)] for p in trainable]


class ZeroThreeExpert:
    """The DeepSpeed ZeRO-3 side of one expert's training: the engine wraps a :func:`_zero3_view` of the bank,
    so only the expert's trained weights (copies) are partitioned, with their gradients and AdamW state; the
    bank keeps its own whole weights, into which the trained ones are gathered
    (``deepspeed.zero.GatheredParameters``, a collective) for dev scoring, checkpoints and the end."""

    def __init__(self, accelerator, bank: nn.Module, bank_params, names, optimizer, settings: dict):
        self.bank_params, self.names = list(bank_params), list(names)
        view, self.params = _zero3_view(bank, self.bank_params)
        mine = {id(b): p for b, p in zip(self.bank_params, self.params, strict=True)}
        for group in optimizer.param_groups:  # not stepped yet; the scheduler stays bound to this optimizer
            group["params"] = [mine[id(p)] for p in group["params"]]
        self.model, self.optimizer = _prepare_with(accelerator, settings, view, optimizer)
        self.zero = self.optimizer.optimizer  # DeepSpeedZeroOptimizer_Stage3

    def weights(self) -> list[torch.Tensor]:
        """Copies of the trained weights, whole on every rank (a collective)."""
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(self.params):
            return [p.detach().clone() for p in self.params]

    def to_bank(self) -> None:
        """Gather the trained weights whole into the bank's own parameters (a collective)."""
        from deepspeed.runtime.zero import GatheredParameters

        with torch.no_grad(), GatheredParameters(self.params):
            for mine, p in zip(self.bank_params, self.params, strict=True):
                mine.copy_(p)

    def from_bank(self) -> None:
        """Partition the bank's weights (a checkpoint loaded them, the same on every rank) into the engine's
        parameters and its fp32 master copy."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad(), GatheredParameters(self.params, modifier_rank=0):
            for mine, p in zip(self.bank_params, self.params, strict=True):
                p.copy_(mine)
        for mine, p in zip(self.bank_params, self.params, strict=True):
            safe_set_full_fp32_param(p, mine.detach())

    def whole_optimizer(self) -> ZeroThreeOptimizerState:
        return ZeroThreeOptimizerState(self.zero, self.params)

    def release(self) -> None:
        """Nothing to release: the bank's parameters were never the engine's."""


class ZeroThreeOptimizerState(_GatheredState):
    """:class:`ZeroOptimizerState` for ZeRO-3 (DeepSpeed's ``safe_get_full_optimizer_state`` /
    ``safe_set_full_optimizer_state``: collectives, every rank at once). dmoerm's AdamW has one param group."""

    def __init__(self, zero_optimizer, params: Sequence[nn.Parameter]):
        self.zero, self.params = zero_optimizer, list(params)

    def _flat_states(self):
        base = self.zero.optimizer
        return [(flat, base.state[flat]) for flat in self.zero.fp32_partitioned_groups_flat]

    def gather(self) -> ZeroThreeOptimizerState:
        from deepspeed.utils import safe_get_full_optimizer_state

        flat, flat_state = self._flat_states()[0]
        moments = sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        state = {}
        for i, p in enumerate(self.params):
            entry = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in flat_state.items() if k not in moments
            }
            for key in moments:
                entry[key] = safe_get_full_optimizer_state(p, key).detach().clone().view(p.ds_shape)
            state[i] = entry
        (group,) = self.zero.optimizer.param_groups
        hyper = {k: v for k, v in group.items() if k != "params"}
        self._state = {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}
        return self

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        (group,) = self.zero.optimizer.param_groups
        (saved_group,) = state["param_groups"]
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        saved = {int(i): entry for i, entry in state["state"].items()}
        first = saved.get(0, {})
        moments = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == self.params[0].ds_shape]
        for flat, flat_state in self._flat_states():  # AdamW's state, created as its first step would
            for key, value in first.items():
                is_moment = key in moments
                flat_state[key] = (
                    torch.zeros_like(flat)
                    if is_moment
                    else (value.clone() if torch.is_tensor(value) else value)
                )
        for i, p in enumerate(self.params):
            for key in moments:
                safe_set_full_optimizer_state(p, saved[i][key].flatten(), key)

"""Several processes for the online loop: ``accelerate launch`` (DDP or FSDP), the batch
sharded.

Plain torch and accelerate (no Kedro, no MLflow); used by
:func:`fgrpo_pipeline.training.loop.train`.

Layout of a step under N processes (ranks). Every rank draws the same P prompt indices from
the trainer's seeded generator (so that generator stays in step on all ranks) and keeps its
own P/N of them, in rank order; the offline minibatches of FDO / f-HAL / DPO, drawn from it
too, are shared out the same way. It samples the G completions of each of its prompts, so
every group lives whole on one rank: rewards and advantages are computed locally and are
exactly those of a single process. Each rank's loss is its mean over its groups and DDP (or
FSDP) averages the gradients, so with the same number of groups on every rank the update is
that of the mean over all P groups; losses that divide by a count the ranks do not share
(DAPO's tokens, FDO's sides, DPO's pairs) divide by its mean over the ranks
(:meth:`Runtime.mean`), with the same effect. Metrics are computed from the values of all
ranks, gathered, so every rank holds the same metrics row: the per-completion ones (rewards,
accuracy, KL to the reference, lengths) exactly as one process would from the whole batch;
the loss and the loss's own metrics as means over the ranks; times as the slowest rank's.

:func:`check_batch_layout` is the up-front check that P divides across the ranks;
:func:`check_launch` adds the checks of the launch environment. A :class:`Runtime` is what the
loop calls for backward passes, clipping, gathering and synchronisation: the single-process
one makes exactly the calls the loop always made, the :class:`AccelerateRuntime` goes through
an ``accelerate.Accelerator``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from fgrpo_pipeline.models.policy import set_seed

MIXED_PRECISIONS = ("no", "bf16", "fp16")


def world_size() -> int:
    """The number of processes of this run: torch.distributed's once it is initialised, else
    ``WORLD_SIZE`` (set by ``accelerate launch`` and ``torchrun``), else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_batch_layout(prompts_per_step: int, group_size: int, world_size: int) -> int:
    """The prompts (groups) each process holds; a ValueError unless P divides across them.

    A group must live whole on one process: its advantages compare its G completions.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    if prompts_per_step % world_size == 0:
        return prompts_per_step // world_size
    completions = prompts_per_step * group_size
    lower = prompts_per_step // world_size * world_size
    upper = lower + world_size
    options = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(
        f"training parameter 'prompts_per_step'={prompts_per_step} is not divisible by the "
        f"{world_size} processes: each rank must hold whole groups (P·G = {completions} "
        f"completions in groups of G={group_size} would be {prompts_per_step / world_size:g} "
        f"groups, {completions / world_size:g} completions, per rank); use a prompts_per_step "
        f"that is a multiple of {world_size}, e.g. {options}"
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_launch(
    prompts_per_step: int,
    group_size: int,
    mixed_precision: str,
    *,
    world: int | None = None,
    offline_batch_size: int | None = None,
) -> int:
    """Check a run against the processes it is launched in, before any work; returns N.

    The batch layout (:func:`check_batch_layout`), the offline preference minibatch (when the
    loss uses one, ``offline_batch_size``: each rank scores an equal share of it), fp16 (loss
    scaling, CUDA only), and that ``accelerate launch --mixed_precision`` (or its config file)
    agrees with the trainer's ``mixed_precision``, which is the one that decides. Warns when
    ``accelerate launch --cpu --num_processes N`` started one process (accelerate runs several
    CPU processes only through mpirun; ``--multi_gpu`` on a machine without CUDA runs N gloo
    processes on the CPU).
    """
    world = world_size() if world is None else world
    check_batch_layout(prompts_per_step, group_size, world)
    if offline_batch_size is not None and offline_batch_size % world:
        raise ValueError(
            f"training parameter 'offline_batch_size'={offline_batch_size} is not divisible by "
            f"the {world} processes: each rank scores an equal share of the offline preference "
            f"minibatch; use a multiple of {world}"
        )
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(
            f"training parameter 'mixed_precision' must be one of {', '.join(MIXED_PRECISIONS)}"
            f", got {mixed_precision!r}"
        )
    if mixed_precision == "fp16" and (not torch.cuda.is_available() or _flag("ACCELERATE_USE_CPU")):
        raise ValueError(
            "training parameter 'mixed_precision'='fp16' needs a CUDA GPU (fp16 training scales "
            "the loss, which only CUDA supports); on the CPU use 'bf16' or 'no'"
        )
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")  # its own config file decides the precision
    if launched is not None and not deepspeed and launched.strip().lower() != mixed_precision:
        raise ValueError(
            f"accelerate launch was given mixed precision {launched.strip().lower()!r} "
            f"(--mixed_precision or its config file) but training parameter 'mixed_precision' "
            f"is {mixed_precision!r}: the training parameter decides, make the two agree"
        )
    if (
        world == 1
        and _flag("ACCELERATE_USE_CPU")
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        warnings.warn(
            "accelerate launch --cpu --num_processes N started ONE process (accelerate runs "
            "several CPU processes only through mpirun): training runs in a single process. "
            "For N processes on the CPU use `accelerate launch --multi_gpu --num_processes N` "
            "(without CUDA the trainer runs them on the CPU with gloo) or torchrun",
            stacklevel=2,
        )
    return world


class Runtime:
    """One process: the calls the loop always made (plain backward, torch clipping, no
    gathering). Subclassed by :class:`AccelerateRuntime`."""

    num_processes = 1
    process_index = 0
    is_main = True
    mixed_precision = "no"
    device: torch.device | None = None  # None: the model stays where it is

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(the model to run forward passes with grad through, the optimiser to step)."""
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self, model: nn.Module) -> Callable[[], AbstractContextManager] | None:
        """A context factory under which backward passes skip the gradient all-reduce."""
        return None

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (a step is applied everywhere or nowhere)."""
        return flag

    def mean(self, value: Tensor) -> Tensor:
        """The mean over the processes of a (detached) tensor."""
        return value

    def gather(self, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Per-sequence tensors of all processes, concatenated in rank order."""
        return tensors

    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order."""
        return [value]

    def wait(self) -> None:
        """A barrier: every process reaches it before any goes on."""

    def seed_step(self, seed: int, step: int) -> None:
        """Seed the global RNGs for a step (several processes: see :func:`rank_seed`)."""
        if self.num_processes > 1:
            set_seed(rank_seed(seed, step, self.process_index))

    def refresh_rollout(self, model: nn.Module, rollout: Any) -> None:
        """After an optimiser step: the rollout copy of a sharded model gets the new full
        weights (without sharding the rollout policy is the model itself)."""
        if self.shards_weights:
            rollout.model.load_state_dict(self.full_state_dict(model))

    def finish(self, model: nn.Module) -> nn.Module:
        """The plain model once training is done (no wrapper, no autocast)."""
        return model

    # Whether the prepared model holds only a shard of the weights (FSDP): rollouts, the
    # reference and snapshots then use a full-weight copy refreshed after every step.
    shards_weights = False

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The prepared model's full (unsharded) weights, on every process."""
        return model.state_dict()

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict[str, Any]:
        """The optimiser's full state_dict (under FSDP gathered from the shards: every
        process must call it)."""
        return optimizer.state_dict()

    def load_full_optimizer_state(self, model: nn.Module, optimizer, state) -> None:
        """Load what :meth:`full_optimizer_state` returned (under FSDP: after ``prepare``,
        each process keeping its shard)."""
        optimizer.load_state_dict(state)


def destroy_process_group() -> None:
    """End this process's torch.distributed group, if any: a process group left alive makes
    gloo abort the interpreter's shutdown (also registered at exit once one is set up).
    Objects still holding FSDP state are collected first, and the ranks meet before the
    group goes: torn down while a peer still talks, gloo aborts the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


_EXIT_HOOK: list[bool] = []


def _torch_optimizer(optimizer):
    """The torch optimiser inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _cpu_fsdp_plugin():
    """accelerate's FSDP plugin, read from the ``FSDP_*`` variables ``accelerate launch``
    sets from its config file, checked for what the CPU cannot do."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    # read before the plugin exists: building it with either one on fails without a GPU
    if _flag("FSDP_SYNC_MODULE_STATES") or _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError(
            "FSDP on the CPU: set fsdp_sync_module_states: false and "
            "fsdp_cpu_ram_efficient_loading: false in the accelerate config (both look for a "
            "GPU); every rank builds the same starting weights anyway. See "
            "conf/accelerate/fsdp2_cpu.yaml"
        )
    return FullyShardedDataParallelPlugin()


def _switch_to_fsdp(accelerator, plugin) -> None:
    """FSDP on CPU processes. accelerate (1.15) switches to FSDP only for GPU-like device
    types and otherwise, silently, runs DDP; torch's FSDP itself runs on the CPU with gloo.
    Both state objects are switched (each new ``AcceleratorState`` copies ``PartialState``'s
    fields), with the plain ``cpu`` device that FSDP takes as its ``device_id``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")
    accelerator.state.fsdp_plugin = plugin


def _unsupported(accelerator) -> str | None:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return "DeepSpeed ZeRO-3"
    return None


class AccelerateRuntime(Runtime):
    """Several processes (or mixed precision) through an ``accelerate.Accelerator``.

    Without CUDA the accelerator runs on the CPU (gloo), also when launched with
    ``accelerate launch --multi_gpu``. Rollouts and the reference need full weights on every
    rank: DDP (and DeepSpeed ZeRO-1/2, untested) keep them; under FSDP (1 or 2, also on the
    CPU: launched with an FSDP config file, see :func:`_switch_to_fsdp`) the trainer keeps a
    full copy for them, loaded from :meth:`full_state_dict` after every step, while the
    gradients and optimiser state stay sharded. DeepSpeed ZeRO-3 is refused.
    """

    def __init__(self, mixed_precision: str = "no", *, micro_batches: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        expected = world_size()
        state = AcceleratorState._shared_state
        if expected == 1 and state and state.get("_mixed_precision") != mixed_precision:
            # One process trains several times (tests, sweeps) with another precision: the
            # accelerator's process-wide state would refuse the change.
            AcceleratorState._reset_state()
        cpu = not torch.cuda.is_available()
        if cpu and _flag("ACCELERATE_USE_DEEPSPEED"):
            raise ValueError(
                "accelerate launch was given a DeepSpeed config on a machine without CUDA: "
                "accelerate would run plain DDP instead. Use DDP or FSDP on the CPU "
                "(conf/accelerate/ddp_cpu.yaml, fsdp2_cpu.yaml); DeepSpeed on GPUs"
            )
        fsdp_plugin = _cpu_fsdp_plugin() if cpu and _flag("ACCELERATE_USE_FSDP") else None
        self.accelerator = accelerator = Accelerator(
            mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=fsdp_plugin
        )
        if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
            _switch_to_fsdp(accelerator, fsdp_plugin)
        if accelerator.num_processes != expected:
            raise RuntimeError(
                f"WORLD_SIZE says {expected} processes but accelerate set up "
                f"{accelerator.num_processes} ({accelerator.distributed_type}); launch with "
                "`accelerate launch --multi_gpu --num_processes N` or torchrun"
            )
        if (kind := _unsupported(accelerator)) is not None:
            raise ValueError(
                f"{kind} shards the weights across ranks, and the trainer gathers full weights "
                "for the rollouts only from FSDP: use FSDP (fsdp_version 2), DDP (accelerate's "
                "multi-GPU / multi-CPU), or DeepSpeed ZeRO stage 1 or 2"
            )
        if micro_batches and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "training parameter 'micro_batch_size' > 0 with DeepSpeed: DeepSpeed steps the "
                "optimiser inside its backward, so the trainer's exact micro-batch accumulation "
                "cannot run; use micro_batch_size: 0 (or DDP)"
            )
        self.shards_weights = accelerator.distributed_type == DistributedType.FSDP
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.mixed_precision = mixed_precision
        self.device = accelerator.device
        if self.num_processes > 1 and not _EXIT_HOOK:
            atexit.register(destroy_process_group)
            _EXIT_HOOK.append(True)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: nn.Module) -> Callable[[], AbstractContextManager] | None:
        if self.num_processes == 1:
            return None
        return lambda: self.accelerator.no_sync(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        # DeepSpeed clips inside its step and reports the norm (a float) or nothing
        return torch.as_tensor(float("nan") if norm is None else norm)

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()

    def all_true(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.gather(value).min().item() > 0)

    def mean(self, value: Tensor) -> Tensor:
        if self.num_processes == 1:
            return value
        return self.accelerator.reduce(value.detach().float().to(self.device), "mean")

    def gather(self, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        if self.num_processes == 1:
            return tensors
        names = list(tensors)
        # one collective: the columns side by side (float64 holds every value exactly)
        stacked = torch.stack(
            [tensors[name].detach().reshape(-1).to(self.device, torch.float64) for name in names],
            dim=1,
        )
        gathered = self.accelerator.gather(stacked).cpu()
        return {
            name: gathered[:, i].to(tensors[name].dtype).contiguous()
            for i, name in enumerate(names)
        }

    def gather_objects(self, value: Any) -> list[Any]:
        if self.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        if not self.shards_weights:
            return super().full_state_dict(self.accelerator.unwrap_model(model))
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # cpu_offload=False: with FSDP1 on the CPU the offloading copy frees storage that is
        # still in use (a segfault, measured with torch 2.13); on GPUs it keeps the copy there
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        return get_model_state_dict(model, options=options)

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict[str, Any]:
        if not self.shards_weights:
            return super().full_optimizer_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)

    def load_full_optimizer_state(self, model: nn.Module, optimizer, state) -> None:
        if not self.shards_weights:
            return super().load_full_optimizer_state(model, optimizer, state)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(
            model, _torch_optimizer(optimizer), optim_state_dict=state, options=options
        )

    def finish(self, model: nn.Module) -> nn.Module:
        # not unwrap_model(keep_fp32_wrapper=False): it unwraps the forward down to the
        # undecorated function, dropping transformers' own decorators with the autocast
        return strip_autocast(self.accelerator.unwrap_model(model))


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The global RNGs' seed of a rank's step (several processes): a rank's draws do not
    depend on its history, so a resumed run (which restores rank 0's RNG states on every
    rank) draws what the uninterrupted one did."""
    return (seed * 100_003 + step) * 1_009 + rank + 1


def make_runtime(mixed_precision: str = "no", *, micro_batches: bool = False) -> Runtime:
    """The single-process runtime when there is one process and no mixed precision (the loop
    exactly as it always ran, no accelerate involved), else an :class:`AccelerateRuntime`."""
    if world_size() == 1 and mixed_precision == "no":
        return Runtime()
    return AccelerateRuntime(mixed_precision, micro_batches=micro_batches)


def strip_autocast(model: nn.Module) -> nn.Module:
    """Undo, in place, accelerate's mixed-precision patch of ``model.forward`` (prepare sets
    it on the model; a deep copy of the model carries it); other models are left untouched."""
    original = model.__dict__.pop("_original_forward", None)
    if original is None:
        return model
    if getattr(original, "__func__", None) is type(model).forward:
        model.__dict__.pop("forward", None)  # the class's forward again
    else:
        model.forward = original
    return model


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Activation checkpointing on ``model`` (the base model of a LoRA policy), non-reentrant
    (works with DDP and frozen inputs); True if this switched it on, False if it already was.

    Only training forwards checkpoint: ``generate`` runs in eval mode, with its KV cache, and
    the trainer's teacher-forced forwards pass ``use_cache=False``.
    """
    base = _base_model(model)
    if _checkpointing_on(base):
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing`, including the hook it puts on the input
    embeddings (their output requires grad, for checkpointed layers under frozen ones)."""
    base = _base_model(model)
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()

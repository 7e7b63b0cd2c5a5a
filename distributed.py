"""The ranks of a torchrun job and what crosses them: the World a process runs in, the collectives the loop uses
(sums, the all-gather of Phase 1's negatives, DDP's gradient average done by hand), DDP itself, and FSDP2's
sharding of the LLM (train.strategy = "fsdp").

    world = setup_distributed(cfg)        # rank, world size and device from torchrun's environment (or one process)
    all_sum(t, world)                      # in place over the ranks
    shard_model(model, cfg.train, world)   # each decoder layer an FSDP2 unit

Each decoder layer is one FSDP unit: its weights live as row shards (dim 0) on the ranks, are gathered just before
the layer runs and freed after (forward and backward), and its LoRA gradients are reduce-scattered back to the
shards. The input embeddings are a unit of their own when lm_head has weights of its own (gathered only while the
tokens are embedded); the rest (final norm, lm_head, projectors) is the root unit, gathered for the whole forward.
The aligner stays whole on every rank and frozen. Frozen base weights and fp32 LoRA share a unit: the
mixed-precision policy gathers both in the base's dtype, and reduces gradients in fp32 into the fp32 shards that
AdamW updates. Checkpoints hold whole tensors (checkpoint.py), so they resume under either strategy, on any number
of ranks.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from config import Config, TrainConfig
from weights import check_tensors
from lora import base_name
from model import LLM, rope_inv_freq
from multimodal import MultimodalLM


@dataclass
class World:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> World:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    rank, local, size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        from datetime import timedelta
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return World(rank, local, size, device)


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is True on any; a single process needs no collective (and no host read)."""
    return flag if world.size == 1 else all_sum(torch.full((), float(flag), device=world.device), world).item() > 0


class GatherRows(torch.autograd.Function):
    """All ranks' rows (world * B, ...) in rank order; the backward sums the gradient over the ranks and gives
    each rank that of its own rows, so the loss of every rank reaches each rank's inputs (open_clip's all-gather
    with gradient; an all-reduce, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world: World) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world.size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.world = x.shape[0], world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = ctx.world.rank * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_rows(x: torch.Tensor, world: World) -> tuple[torch.Tensor, int]:
    """`AlignModel.gather` under torchrun: (all ranks' rows, where this rank's start)."""
    return GatherRows.apply(x, world), world.rank * x.shape[0]


def data_parallel(model: MultimodalLM, world: World) -> nn.Module:
    """The model as the step calls it: wrapped in DDP under torchrun, as it is on one process or sharded (FSDP)."""
    if world.size == 1 or is_sharded(model):  # FSDP2 syncs its own gradients
        return model
    # the buffers are frozen (RoPE frequencies, an NF4 base's 4-bit weights): nothing to broadcast at each step
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})  # older torch: broadcast_buffers
    return ddp(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None, **no_sync)


def average_gradients(params: list[nn.Parameter], world: World) -> None:
    """DDP's average of the gradients over the ranks, as one all-reduce of all of them flattened."""
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world.size
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def materialize_sharded(model: MultimodalLM, cfg: TrainConfig, world: World, fill_base) -> None:
    """Shard a model whose LLM base is on the meta device (`shard_model`), give each rank the memory of its
    shards, copy in what was already made (LoRA, projectors, aligner), and let `fill_base(llm)` fill the base's
    shards (`read_shards`, or bench.py's random weights)."""
    made = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
    shard_model(model, cfg, world)
    model.to_empty(device=world.device)  # every tensor gets (uninitialised) memory: the rank's shards, the rest whole
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in made.items():
            tensors[name].copy_(shard_of(tensors[name], t.to(world.device)))
        model.llm.inv_freq.copy_(rope_inv_freq(model.llm.config))
        fill_base(model.llm)


def shard_model(model: MultimodalLM, cfg: TrainConfig, world: World) -> None:
    """Make each decoder layer, the input embeddings (when lm_head has weights of its own), then the whole model,
    an FSDP2 unit over all ranks (the aligner left out)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    base = model.llm.lm_head.weight.dtype
    policy = MixedPrecisionPolicy(param_dtype=None if base == torch.float32 else base, reduce_dtype=torch.float32)
    for layer in model.llm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    if not model.llm.config.tie_word_embeddings:  # gathered only while the tokens are embedded
        fully_shard(model.llm.model.embed_tokens, mesh=mesh, mp_policy=policy)
    root = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)  # the batch's media and label weights keep their dtypes
    fully_shard(model, mesh=mesh, mp_policy=root, ignored_params=set(model.aligner.parameters()))


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was made an FSDP2 unit (`shard_model`). Where FSDP was never imported, nothing was sharded:
    the check imports nothing (importing FSDP and DTensor costs seconds, sympy among them)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2 shard), without importing DTensor where none was made."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(t, tensor.DTensor)


def shard_rows(t: torch.Tensor) -> tuple[int, int]:
    """(first row, rows) of this rank's shard of a parameter: FSDP2 cuts dim 0 into world-size chunks of
    ceil(n / world) rows, the last ones shorter or empty."""
    if not is_dtensor(t) or t.dim() == 0:
        return 0, t.shape[0] if t.dim() else 0
    chunk = -(-t.shape[0] // t.device_mesh.size())
    return t.device_mesh.get_local_rank() * chunk, t.to_local().shape[0]


def shard_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor of `param`'s shape) as `param` holds it: this rank's rows as a DTensor like it, or
    whole."""
    if not is_dtensor(param) or full.dim() == 0:
        return full
    from torch.distributed.tensor import DTensor

    first, rows = shard_rows(param)
    return DTensor.from_local(full[first:first + rows].contiguous(), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def read_shards(llm: LLM, files: list[Path]) -> None:
    """Each rank copies its rows of every base weight from the safetensors files (one file at a time, only those
    rows read), after checking the files' names and shapes against the model's."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    params = {base_name(n): p for n, p in llm.named_parameters() if ".lora_" not in n}
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            found |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    skip = ("lm_head.weight",) if llm.config.tie_word_embeddings else ()
    check_tensors({k: tuple(p.shape) for k, p in params.items()}, found, f"{files[0].parent}: checkpoint does not "
                  "fit the model config (is the folder for another model family or size?)", skip)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                p = params[key]
                local = p.to_local() if isinstance(p, DTensor) else p
                first, rows = shard_rows(p)
                part = sf.get_slice(key)[first:first + rows] if p.dim() else sf.get_tensor(key)
                local.copy_(part.to(local.dtype))


def gradient_sync(model: nn.Module, last: bool):
    """The context of a micro-batch's backward: under DDP `no_sync` but for the last micro-batch; under FSDP its
    gradient sync turned off the same way; on one process, nothing."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece: an FSDP shard (a DTensor) gathered from every rank; any other as it is."""
    return t.full_tensor() if is_dtensor(t) else t

"""Building the model a config describes: the tokenizer, the LLM (bf16 or NF4, or sharded over FSDP's ranks as
it is read), the frozen aligner, projectors and LoRA, with training's kernels, activation checkpointing and
torch.compile where the config asks for them. Training, generation, the pre-flight checks and the benchmarks all
build it here.

    tokenizer, model = build_model(cfg, torch.device("cuda"))    # MultimodalLM, or align.AlignModel in Phase 1
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import align
import lora
from weights import check_tensors
from model import LLM, DecoderLayer, LLMConfig, llm_skeleton, load_llm
from tokenizer import Tokenizer, load_tokenizer
from encoders import Aligner, load_aligner
from multimodal import MODALITIES, MultimodalLM, Projector, cross_entropy_chunk, document_block_mask, document_mask
from quant import NF4Linear, load_llm_nf4
from config import Config, TrainConfig
from distributed import World, gather_rows, materialize_sharded, read_shards
from checkpoint import Start, read_start

# ----------------------------------------------------------------------------------------------------------------
# The model: built whole on each rank (ddp), or sharded over the ranks as it is read (fsdp; distributed.py)


def build_model(cfg: Config, device: torch.device, adapters: bool = True, world: World | None = None,
                tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, MultimodalLM | align.AlignModel]:
    """Tokenizer (`tokenizer` if one was loaded already), LLM (frozen, with LoRA unless `adapters` is False), frozen
    aligner and projectors, as the config says; in Phase 1 (train.phase = "align") the aligner to train, on the
    frozen LLM (`align.AlignModel`), its negatives gathered from every rank of `world`. With train.strategy =
    "fsdp", the model sharded over `world` (`build_sharded`)."""
    tokenizer = tokenizer or load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.model.dtype]
    if cfg.train.strategy == "fsdp":
        return tokenizer, build_sharded(cfg, world or World(device=device), tokenizer, dtype)
    if cfg.model.quantize == "nf4":  # QLoRA: the decoder layers' weights in NF4, quantized as they are read
        llm = load_llm_nf4(cfg.model.llm, device, dtype, cfg.model.quant_block, cfg.model.double_quant)
    else:
        llm = load_llm(cfg.model.llm, device, dtype)
    if cfg.train.phase == "align":
        aligner = load_aligner(cfg.model.aligner, device, init_missing=True)
        torch.manual_seed(cfg.train.seed)  # the same text head on every rank
        gather = functools.partial(gather_rows, world=world) if world is not None and world.size > 1 \
            else align.gather_one
        return tokenizer, align.AlignModel(aligner, llm, cfg.train.align_encoders, gather).to(device)
    aligner = load_aligner(cfg.model.aligner, device)
    media_ids = {m: tokenizer.media_token_id(m) for m in MODALITIES}
    return tokenizer, assemble(cfg, llm, aligner, media_ids, adapters)


def build_sharded(cfg: Config, world: World, tokenizer: Tokenizer, dtype: torch.dtype) -> MultimodalLM:
    """`build_model` under FSDP, with no whole copy of the base anywhere: the LLM is built on the meta device,
    LoRA, projectors and aligner are made as `assemble` makes them (LoRA on the CPU: its base has no device yet),
    the model is sharded, and each rank reads only its rows of each base weight from the safetensors files, one
    file at a time."""
    if world.size < 2:
        raise ValueError("train.strategy = \"fsdp\" shards the model over torchrun's processes: run it under torchrun "
                         "with 2 or more (bash launch.sh CONFIG), or use train.strategy = \"ddp\" on one process")
    llm, files = llm_skeleton(cfg.model.llm)
    llm.to(dtype)
    aligner = load_aligner(cfg.model.aligner, world.device)
    model = assemble(cfg, llm, aligner, {m: tokenizer.media_token_id(m) for m in MODALITIES})
    materialize_sharded(model, cfg.train, world, lambda sharded_llm: read_shards(sharded_llm, files))
    return model


def assemble(cfg: Config, llm: LLM, aligner: Aligner, media_ids: dict[str, int], adapters: bool = True
             ) -> MultimodalLM:
    """Add projectors and LoRA (unless `adapters` is False: an LLM with LoRA merged) to a loaded LLM and aligner,
    on top of train.init_from's start where one is given (`start_from`); install training's kernels, activation
    checkpointing (`CheckpointedLayer`) and compilation as the config asks. With train.objective = "dpo" the
    projectors are frozen: the reference model shares them."""
    torch.manual_seed(cfg.train.seed)  # the same projector and LoRA initialisation on every rank
    H, D = llm.config.hidden_size, aligner.config.dim
    K = cfg.model.tokens_per_media
    projectors = {m: Projector(D, cfg.model.projector_hidden or H, H, K[m], cfg.model.projector_mode)
                  for m in MODALITIES}
    if cfg.model.shared_projector:
        projectors = {m: projectors["image"] for m in MODALITIES}
    projectors = nn.ModuleDict(projectors).to(next(aligner.parameters()).device)
    if cfg.train.init_from and adapters:
        start_from(read_start(cfg.train.init_from), llm, projectors)
    if cfg.train.objective == "dpo":
        projectors.requires_grad_(False)
    if adapters:
        targets = cfg.lora.targets if cfg.lora.targets == "all-linear" else \
            [t.strip() for t in cfg.lora.targets.split(",")]
        lora.apply_lora(llm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
    else:
        llm.requires_grad_(False)
    # training's kernels, which run in train mode (eval mode runs the plain forwards); a step recorded whole
    # (train.cuda_graph) recomputes the adapters' dropout in the backward
    lora.stack_lora(llm, recompute_dropout=cfg.train.cuda_graph)
    lora.fuse_qkv(llm, recompute_dropout=cfg.train.cuda_graph)
    if cfg.train.activation_checkpointing:
        layers = llm.model.layers
        for i, layer in enumerate(layers):
            layers[i] = CheckpointedLayer(layer, offload=cfg.train.offload_activations)
    on_gpu = next(aligner.parameters()).is_cuda  # (the LLM may still be on the meta device, to be sharded)
    masks = loss_and_mask(cfg.train, on_gpu, llm.config)
    model = MultimodalLM(llm, aligner, projectors, media_ids, cfg.model.loss_chunk, **masks)
    compile_model(model, cfg.train)
    return model


def start_from(start: Start, llm: LLM, projectors: nn.ModuleDict) -> None:
    """train.init_from: the start's LoRA into `llm`, its projectors into `projectors`. The adapter is merged into the
    base weights where they are plain tensors in memory (the model is a plain one again); on an NF4 base, or one
    still on the meta device (FSDP reads it sharded later), it stays as a frozen adapter, which this run's adapters
    then wrap."""
    lora.apply_lora(llm, start.rank, start.alpha, 0.0, start.targets)
    lora.set_adapter(llm, start.adapter, start.rank, start.alpha, f"{start.folder} (train.init_from)")
    llm.requires_grad_(False)
    if all(isinstance(m.base_layer, nn.Linear) and not m.base_layer.weight.is_meta
           for m in lora.lora_modules(llm).values()):
        lora.merge_and_unload(llm)
    expected = dict(projectors.named_parameters())  # a shared projector once (an export names it twice)
    found = {k: v.shape for k, v in start.projectors.items() if k in expected or k not in projectors.state_dict()}
    check_tensors({k: v.shape for k, v in expected.items()}, found, f"{start.folder}: the start's projectors do not "
                  "fit this run's (model.image_tokens, audio_tokens, projector_* and shared_projector must be the "
                  "start's)")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(start.projectors[k])


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing and torch.compile, applied from outside the layers


class CheckpointedLayer(DecoderLayer):
    """A decoder layer under activation checkpointing, which `assemble` puts in the layer's place with the layer's
    own modules (so the weights and their names are unchanged). In train mode its forward keeps only its inputs,
    and the backward computes the layer again from them; with `offload`, the input waits in host memory meanwhile
    (`HostStash`). In eval mode (evaluation, generation) it is the plain layer. Being the layer's own forward, a
    compiled layer compiles the recomputation too."""

    def __init__(self, layer: DecoderLayer, offload: bool = False):
        nn.Module.__init__(self)  # no new tensors: the layer's modules, under their names
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.offload, self.training = offload, layer.training

    def forward(self, x, cos, sin, mask=None, cache=None, cache_start=0):
        layer = super().forward
        if not self.training:
            return layer(x, cos, sin, mask, cache, cache_start)
        if self.offload:
            stash = HostStash(x)
            return checkpoint(lambda *a: layer(stash.take(), *a), cos, sin, mask, cache, cache_start,
                              use_reentrant=False)
        return checkpoint(layer, x, cos, sin, mask, cache, cache_start, use_reentrant=False)


class HostStash:
    """A checkpointed layer's input (B, T, H), moved to host memory once the layer's forward has it (torchtune's
    activation offloading): `take()` gives the tensor itself the first time (the forward), then a copy back on its
    device (the recomputation in the backward). The copies are queued on the current stream, so they keep its
    order without a sync; the host buffer is pinned, where the tensor is on a GPU."""

    def __init__(self, x: torch.Tensor):
        self.x, self.host, self.device, self.requires_grad = x, None, x.device, x.requires_grad

    def take(self) -> torch.Tensor:
        if self.host is None:
            x, self.x = self.x, None  # this layer no longer holds the device's copy
            self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
            self.host.copy_(x.detach(), non_blocking=x.is_cuda)
            return x
        return self.host.to(self.device, non_blocking=True).requires_grad_(self.requires_grad)


def loss_and_mask(cfg: TrainConfig, on_gpu: bool, llm: LLMConfig) -> dict:
    """`MultimodalLM`'s loss chunk and its packed rows' mask in training. On a GPU the loss's chunk is compiled, so
    that the softmax and its gradient are a few fused passes over the logits. Where the layers are compiled on a GPU,
    the mask is flex attention's BlockMask, whose hidden blocks compiled flex attention skips; not in the modes that
    record each layer as a CUDA graph, which would record it again at every step (each step's block mask is made of
    new tensors), nor for a sliding-window model, whose window is a band on a boolean mask."""
    flex = on_gpu and cfg.compile in ("default", "max-autotune-no-cudagraphs") and llm.sliding_window is None
    return {"chunk_loss": torch.compile(cross_entropy_chunk, dynamic=True) if on_gpu else cross_entropy_chunk,
            "training_mask": document_block_mask if flex else document_mask}


def compile_model(model: MultimodalLM, cfg: TrainConfig) -> None:
    """With `train.compile`, each decoder layer compiled (`module.compile()`: one graph, shared by all layers: same
    code, same shapes), and the compiler's settings, in one place. Evaluation and generation run the layers eager
    (`evaluate` sets torch.compiler's "force_eager" stance), since their shapes change from call to call. Under FSDP2
    each layer is also a sharded unit, and its gathering hooks stay outside the compiled code: FSDP2 marks them for
    the compiler to skip (torch._dynamo.disable), so they run eagerly around the compiled forward."""
    if cfg.compile == "none":
        return
    dynamic = None
    if cfg.activation_checkpointing:  # static shapes: Inductor's partitioner fails on dynamic ones with the
        dynamic = False  # recomputation inside; one compilation per batch shape, not eager after Dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # dropout through ATen's generator rather than Inductor's: the compiled layers draw the masks the eager layers
    # draw (so compiled and eager steps agree), and the step is faster (BENCHMARKS.md)
    torch._inductor.config.fallback_random = True
    torch._functorch.config.activation_memory_budget = cfg.activation_memory_budget
    for layer in model.llm.model.layers:
        layer.compile(mode=None if cfg.compile == "default" else cfg.compile, dynamic=dynamic)


def parameter_groups(model: MultimodalLM | align.AlignModel) -> dict[str, list[nn.Parameter]]:
    """The parts of the model as the parameter report shows them."""
    if isinstance(model, align.AlignModel):
        return {"aligner": list(model.aligner.parameters()), "text head": [*model.text_head.parameters(),
                                                                           model.logit_scale],
                "llm": list(model.llm.parameters())}
    params = list(model.llm.parameters())
    # an NF4 weight is buffers, not a parameter: a meta tensor of its shape counts it as frozen
    nf4 = [torch.empty(m.out_features, m.in_features, device="meta") for m in model.llm.modules()
           if isinstance(m, NF4Linear)]
    # the run's adapters; a frozen start adapter inside them (train.init_from) counts as part of the frozen LLM
    adapters = {id(p) for m in lora.outer_lora_modules(model.llm).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    return {"aligner": list(model.aligner.parameters()), "projectors": list(model.projectors.parameters()),
            "llm": [p for p in params if id(p) not in adapters] + nf4, "lora": [p for p in params if id(p) in adapters]}

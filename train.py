"""Training of mmlora, both phases in one torchrun-driven DDP loop: Phase 2 (train.phase = "instruct") trains
projectors + LoRA on multimodal conversations; Phase 1 (train.phase = "align", align.py) trains the aligner on
image-text, audio-text and image-audio pairs.

    python train.py --config configs/demo.toml                                  # one process (CPU or one GPU)
    python train.py --config configs/demo-align.toml                            # Phase 1 -> <out_dir>/aligner/
    torchrun --nproc_per_node=8 train.py --config configs/qwen2.5-0.5b.toml     # DDP; or: bash launch.sh CONFIG
    python train.py --config configs/demo.toml --train.max_steps=20 --run.out_dir=runs/x   # overrides

Read top to bottom: config -> model -> data stream -> checkpoints -> metrics -> eval -> the step -> the loop
(`fit`) -> the whole-step CUDA graph, an opt-in wrapper around the step (`GraphedStep`) -> FSDP2, the opt-in
sharding of the LLM over the ranks (train.strategy = "fsdp": `build_sharded`).
Every optimizer step consumes `batch_size * grad_accum * world_size` samples of one global stream (epoch-seeded
permutations, concatenated), so the data position is one number and a resume on any number of ranks continues
from the same global sample. The loss of a step is summed over tokens (Phase 1: pairs) and divided by the labelled
tokens (pairs) of the whole step on all ranks, so 1 rank and N ranks with the same global batch compute the same
gradient.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention.flex_attention import BlockMask

import align
import data
import demo
import lora
from model import (MODALITIES, LLM, Aligner, LossOutput, MultimodalLM, Projector, Tokenizer, check_tensors,
                   copy_aligner, cross_entropy_chunk, document_block_mask, document_mask, llm_skeleton, load_aligner,
                   load_llm, load_tokenizer, parameter_report, rope_inv_freq, save_llm, save_tensors, weights_hash,
                   write_json)

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass per TOML section; every key has a default and a comment


@dataclass
class ModelConfig:
    llm: str = ".cache/demo/llm"  # Hugging Face folder of the LLM (config.json, safetensors, tokenizer.json)
    aligner: str = ".cache/demo/align/aligner"  # Phase-1 aligner folder (aligner.json + aligner.safetensors)
    chat_format: str = ""  # "" = from tokenizer_config.json's template or the family; or chatml, qwen2.5, llama3, ...
    dtype: str = "auto"  # frozen LLM weights: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16
    image_tokens: int = 16  # K: LLM tokens per image
    audio_tokens: int = 8  # K: LLM tokens per audio clip
    projector_hidden: int = 0  # width of the projector's middle layer; 0 = the LLM's hidden size
    projector_mode: str = "pool"  # pool: N encoder tokens pooled to K; pooled: the pooled embedding repeated K times
    shared_projector: bool = False  # one projector for images and audio (ImageBind-LLM's design: what it learns on
    # one modality applies to the other through the aligned space); needs image_tokens == audio_tokens
    loss_chunk: int = 512  # labelled positions per lm_head chunk in the loss: one chunk's logits (chunk x vocab) and
    # their gradient are the step's largest temporary; smaller chunks read the lm_head weight more often (BENCHMARKS.md)

    @property
    def tokens_per_media(self) -> dict[str, int]:
        return {"image": self.image_tokens, "audio": self.audio_tokens}


@dataclass
class LoRAConfig:
    rank: int = 16  # r
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the LoRA input
    targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names, or all-linear


@dataclass
class DataConfig:
    train_file: str = ".cache/demo/data/train.jsonl"  # JSONL or JSON list of conversations
    val_file: str = ".cache/demo/data/val.jsonl"  # validation set ("" = none)
    make_demo: str = ""  # folder in which to make the embedded demo assets on first use ("" = never)
    max_len: int = 512  # tokens per sample (and per packed row)
    truncate: bool = False  # cut samples longer than max_len (never inside a media block) instead of an error
    pack: bool = False  # pack several samples per row, with no attention across them
    on_error: str = "raise"  # bad sample: raise (stop, naming it) or skip (leave out, list in skipped.jsonl)
    allow_outside_paths: bool = False  # allow media paths outside the data file's folder
    feature_cache: str = ""  # folder of cached aligner features (train.py --build_feature_cache makes it)
    num_workers: int = 0  # DataLoader worker processes per rank
    pad_multiple: int = 8  # pad rows to a multiple of this many tokens (64 keeps compiled shapes few)
    max_audio_windows: int = 1  # a clip longer than the aligner's window becomes up to this many windows of K tokens


@dataclass
class TrainConfig:
    phase: str = "instruct"  # instruct: Phase 2 (projectors + LoRA on conversations); align: Phase 1 (the aligner
    # on pairs, align.py), which writes <out_dir>/aligner/
    batch_size: int = 8  # samples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in all
    lr_projector: float = 1e-3  # peak learning rate of the projectors
    lr_lora: float = 2e-4  # peak learning rate of the LoRA adapters
    lr_aligner: float = 1e-3  # Phase 1: peak learning rate of the aligner's heads (and encoders) and the text head
    align_encoders: bool = False  # Phase 1: train our own encoders too, not only the heads (HF towers stay frozen)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear warmup, then cosine decay to min_lr_ratio * peak
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    amp: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with GradScaler), fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant)
    compile: str = "none"  # torch.compile per decoder layer: none, default, reduce-overhead (CUDA graphs per layer),
    # max-autotune (searched Triton matmul kernels, CUDA graphs per layer), max-autotune-no-cudagraphs
    cuda_graph: bool = False  # each batch shape's whole step recorded as one CUDA graph and replayed (GPU, bf16/fp32;
    # see GraphedStep)
    activation_memory_budget: float = 1.0  # with train.compile: below 1, the compiler saves fewer activations for the
    # backward and recomputes cheap elementwise work there (norms, activations, RoPE) instead: less memory, more work
    strategy: str = "ddp"  # ddp: every rank holds the whole model; fsdp: torch's FSDP2 shards the LLM's weights over
    # the ranks (each decoder layer a unit), for bases too big for one GPU (torchrun with 2 or more ranks)
    fsdp_reshard_after_forward: bool = True  # fsdp: free each layer's gathered weights after its forward (less
    # memory; the backward gathers them again)
    eval_every: int = 200  # steps between evaluations (0 = only at the end)
    eval_samples: int = 0  # validation samples for the loss (0 = all)
    gen_samples: int = 64  # validation samples answered by greedy generation (exact-match accuracy)
    max_new_tokens: int = 8  # tokens generated per answer
    save_every: int = 200  # steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # periodic checkpoints kept
    resume: str = "auto"  # auto (latest in out_dir), none, or a checkpoint folder
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    seed: int = 0  # seed of the data order, initialisation and dropout


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # checkpoints, metrics.csv/jsonl, config.json, logs
    log_every: int = 10  # steps between progress lines and metric rows
    device: str = "auto"  # auto (cuda if available), cpu, cuda


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {("train", "phase"): ("instruct", "align"), ("model", "dtype"): ("auto", "float32", "bfloat16"),
           ("model", "projector_mode"): ("pool", "pooled"),
           ("data", "on_error"): ("raise", "skip"), ("train", "amp"): ("auto", "bf16", "fp16", "fp32"),
           ("train", "compile"): ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           ("run", "device"): ("auto", "cpu", "cuda"), ("train", "strategy"): ("ddp", "fsdp")}
POSITIVE = {("lora", "rank"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "max_steps"),
            ("data", "max_len"), ("model", "image_tokens"), ("model", "audio_tokens"), ("model", "loss_chunk"),
            ("run", "log_every"), ("data", "pad_multiple"), ("train", "keep_last"), ("train", "max_bad_steps"),
            ("data", "max_audio_windows")}
NON_NEGATIVE = {("train", "lr_projector"), ("train", "lr_lora"), ("train", "lr_aligner"), ("train", "weight_decay"),
                ("train", "warmup_steps"),
                ("train", "grad_clip"), ("lora", "dropout"), ("train", "eval_every"), ("train", "save_every"),
                ("train", "eval_samples"), ("train", "gen_samples"), ("data", "num_workers")}


def set_key(cfg: Config, section: str, key: str, value, source: str) -> None:
    """Set `section.key`, checking that both exist and that the value has the field's type."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"{source}: unknown section [{section}]; known sections: {', '.join(sections)}")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise ValueError(f"{source}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(fields)}")
    typ = type(getattr(type(sub)(), key))
    if source == "command line" and typ is not str:  # text to parse
        try:
            value = {"true": True, "false": False}[value.lower()] if typ is bool else typ(value)
        except (KeyError, ValueError):
            raise ValueError(f"{source}: {section}.{key} must be {typ.__name__}, got {value!r}") from None
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise ValueError(f"{source}: {section}.{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    setattr(sub, key, value)


def check_config(cfg: Config) -> None:
    """Reject impossible values, naming the key and what is allowed."""
    for (s, k), allowed in CHOICES.items():
        if getattr(getattr(cfg, s), k) not in allowed:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)!r}; allowed: {', '.join(allowed)}")
    for s, k in POSITIVE:
        if getattr(getattr(cfg, s), k) < 1:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)}; it must be at least 1")
    for s, k in NON_NEGATIVE:
        if getattr(getattr(cfg, s), k) < 0:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)}; it must be >= 0")
    if not 0.0 <= cfg.train.activation_memory_budget <= 1.0:
        raise ValueError(f"train.activation_memory_budget = {cfg.train.activation_memory_budget}; it must be in [0, 1]")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio = {cfg.train.min_lr_ratio}; it must be in [0, 1]")
    if cfg.lora.dropout >= 1.0:
        raise ValueError(f"lora.dropout = {cfg.lora.dropout}; it must be in [0, 1)")
    if cfg.train.cuda_graph:
        GraphedStep.check_config(cfg)
    if cfg.train.strategy == "fsdp" and cfg.train.cuda_graph:
        raise ValueError("train.strategy = \"fsdp\" gathers and frees weights with collectives around each layer, "
                         "which a recorded step cannot hold: set train.cuda_graph = false with it")
    if cfg.train.strategy == "fsdp" and cfg.train.compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.compile = \"{cfg.train.compile}\" records each layer as a CUDA graph, and FSDP's "
                         "gathered weights move from step to step (every step would record again): use \"default\" "
                         "or \"max-autotune-no-cudagraphs\" with train.strategy = \"fsdp\"")
    if cfg.train.strategy == "fsdp" and cfg.train.phase == "align":
        raise ValueError("train.strategy = \"fsdp\" shards Phase 2's LLM; Phase 1 trains the aligner's small heads "
                         "with the LLM frozen and runs with ddp: set train.strategy = \"ddp\"")
    if cfg.train.phase == "align" and cfg.data.feature_cache:
        raise ValueError("train.phase = \"align\" trains the aligner, so its features cannot come from a cache: "
                         "set data.feature_cache = \"\"")
    if cfg.model.shared_projector and cfg.model.image_tokens != cfg.model.audio_tokens:
        raise ValueError(f"model.shared_projector gives images and audio one projector, so model.image_tokens "
                         f"({cfg.model.image_tokens}) and model.audio_tokens ({cfg.model.audio_tokens}) must be equal")
    longest = max(cfg.model.image_tokens, cfg.model.audio_tokens)
    if cfg.data.max_len <= longest:
        raise ValueError(f"data.max_len = {cfg.data.max_len} cannot hold one media block of {longest} tokens "
                         "(model.image_tokens / model.audio_tokens); raise data.max_len")


def config_from_dict(doc: dict, source: str, cfg: Config | None = None) -> Config:
    """{section: {key: value}} (a TOML file, or a run's config.json) onto `cfg` (default: the defaults), checked."""
    cfg = cfg or Config()
    for section, values in doc.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: {section!r} must be a [section]; sections: model, lora, data, train, run")
        for key, value in values.items():
            set_key(cfg, section, key, value, source)
    return cfg


def load_config(path: str | None, overrides: list[str]) -> Config:
    """TOML file, then `--section.key=value` overrides; unknown keys and wrong types are errors."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        config_from_dict(doc, path, cfg)
    for o in overrides:
        if not o.startswith("--") or "=" not in o or "." not in o.split("=", 1)[0]:
            raise ValueError(f"override {o!r}: write --section.key=value")
        name, value = o[2:].split("=", 1)
        section, key = name.split(".", 1)
        set_key(cfg, section, key, value, "command line")
    check_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup and the model


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


def build_model(cfg: Config, device: torch.device, adapters: bool = True, world: World | None = None
                ) -> tuple[Tokenizer, MultimodalLM | align.AlignModel]:
    """Tokenizer, LLM (frozen, with LoRA unless `adapters` is False), frozen aligner and projectors, as the config
    says; in Phase 1 (train.phase = "align") the aligner to train, on the frozen LLM (`align.AlignModel`). With
    train.strategy = "fsdp", the model sharded over `world` (`build_sharded`)."""
    tokenizer = load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.model.dtype]
    if cfg.train.strategy == "fsdp":
        return tokenizer, build_sharded(cfg, world or World(device=device), tokenizer, dtype)
    llm = load_llm(cfg.model.llm, device, dtype)
    if cfg.train.phase == "align":
        aligner = load_aligner(cfg.model.aligner, device, init_missing=True)
        torch.manual_seed(cfg.train.seed)  # the same text head on every rank
        return tokenizer, align.AlignModel(aligner, llm, cfg.train.align_encoders).to(device)
    aligner = load_aligner(cfg.model.aligner, device)
    media_ids = {m: tokenizer.media_token_id(m) for m in MODALITIES}
    return tokenizer, assemble(cfg, llm, aligner, media_ids, adapters)


def assemble(cfg: Config, llm: LLM, aligner: Aligner, media_ids: dict[str, int], adapters: bool = True
             ) -> MultimodalLM:
    """Add projectors and LoRA (unless `adapters` is False: an LLM with LoRA merged) to a loaded LLM and aligner;
    set activation checkpointing and compilation."""
    torch.manual_seed(cfg.train.seed)  # the same projector and LoRA initialisation on every rank
    H, D = llm.config.hidden_size, aligner.config.dim
    K = cfg.model.tokens_per_media
    projectors = {m: Projector(D, cfg.model.projector_hidden or H, H, K[m], cfg.model.projector_mode)
                  for m in MODALITIES}
    if cfg.model.shared_projector:
        projectors = {m: projectors["image"] for m in MODALITIES}
    projectors = nn.ModuleDict(projectors).to(next(aligner.parameters()).device)
    if adapters:
        targets = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
        lora.apply_lora(llm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
    else:
        llm.requires_grad_(False)
    lora.fuse_qkv(llm)
    llm.gradient_checkpointing = cfg.train.activation_checkpointing
    model = MultimodalLM(llm, aligner, projectors, media_ids, cfg.model.loss_chunk)
    compile_model(model, cfg.train)
    return model


def compile_model(model: MultimodalLM, cfg: TrainConfig) -> None:
    """torch.compile where it pays, and the compiler's settings, in one place.

    On a GPU the loss's chunk is compiled, so that the softmax and its gradient are a few fused passes over the
    logits. With `train.compile`, each decoder layer is compiled (one graph, shared by all layers: same code, same
    shapes). Evaluation and generation run them eager (`evaluate` sets torch.compiler's "force_eager" stance),
    since their shapes change from call to call."""
    on_gpu = next(model.aligner.parameters()).is_cuda  # (the LLM may still be on the meta device, to be sharded)
    if on_gpu:
        model.chunk_loss = torch.compile(cross_entropy_chunk, dynamic=True)
    if cfg.compile == "none":
        return
    # compiled, flex attention skips what packed rows' masks hide; not in the modes that record each layer as a CUDA
    # graph, which would record it again at every step (each step's block mask is made of new tensors)
    if on_gpu and cfg.compile in ("default", "max-autotune-no-cudagraphs"):
        model.document_mask = training_document_mask
    dynamic = None
    if cfg.activation_checkpointing:  # static shapes: Inductor's partitioner fails on dynamic ones with the
        dynamic = False  # recomputation inside; one compilation per batch shape, not eager after Dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # dropout through ATen's generator rather than Inductor's: the compiled layers draw the masks the eager layers
    # draw (so compiled and eager steps agree), and the step is faster (BENCHMARKS.md)
    torch._inductor.config.fallback_random = True
    torch._functorch.config.activation_memory_budget = cfg.activation_memory_budget
    mode = None if cfg.compile == "default" else cfg.compile
    for layer in model.llm.model.layers:
        if cfg.strategy == "fsdp":  # the layer's forward only: FSDP's hooks on the layer stay outside the compiled code
            layer.forward = torch.compile(layer.forward, mode=mode, dynamic=dynamic)
        else:
            layer.compile(mode=mode, dynamic=dynamic)


def training_document_mask(doc: torch.Tensor) -> torch.Tensor | BlockMask:
    """Packed rows' mask where the layers are compiled: a BlockMask for the training step's flex attention; the
    dense mask for evaluation, which runs the layers eager (flex attention uncompiled computes every score)."""
    return document_block_mask(doc) if torch.is_grad_enabled() else document_mask(doc)


def parameter_groups(model: MultimodalLM | align.AlignModel) -> dict[str, list[nn.Parameter]]:
    """The parts of the model as the parameter report shows them."""
    if isinstance(model, align.AlignModel):
        return {"aligner": list(model.aligner.parameters()), "text head": [*model.text_head.parameters(),
                                                                           model.logit_scale],
                "llm": list(model.llm.parameters())}
    named = list(model.llm.named_parameters())
    return {"aligner": list(model.aligner.parameters()), "projectors": list(model.projectors.parameters()),
            "llm": [p for n, p in named if ".lora_" not in n], "lora": [p for n, p in named if ".lora_" in n]}


def trainable_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the trainable tensors (projectors + LoRA), by their names in the model, whole
    (under FSDP each is gathered from its shards: every rank must call this)."""
    return {n: whole(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece: an FSDP shard (a DTensor) gathered from every rank; any other as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def optimizer_state(model: nn.Module, opt) -> dict:
    """The optimizer's state by parameter name, each tensor whole (`whole`), so that a checkpoint resumes under
    either strategy and on any number of ranks."""
    sd = opt.state_dict()  # "state" is keyed by each parameter's place in the groups
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: {k: whole(v) for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, opt, saved: dict) -> None:
    """`optimizer_state`'s output into `opt`, each tensor cut to this rank's shard where the parameter is one."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if sorted(current) != sorted(saved_names) or len(opt.param_groups) != len(saved["param_groups"]):
        differ = sorted(set(current) ^ set(saved_names))
        raise KeyError(f"the optimizer state is for other parameters ({differ[:3]}) or groups than this model's")
    state = {i: {k: shard_of(params[n], v) for k, v in saved["state"][n].items()}
             for i, n in enumerate(current) if n in saved["state"]}
    groups, first = [], 0
    for g, saved_group in zip(opt.param_groups, saved["param_groups"]):  # matched by position, as torch does
        groups.append({**saved_group, "params": list(range(first, first + len(g["params"])))})
        first += len(g["params"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------------------------
# The data stream: epoch-seeded permutations, concatenated; step s owns samples [s*G, (s+1)*G)


class StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of indices) from global sample `start` on.

    Each optimizer step takes G = batch * accum * world samples of the stream; its micro-step a on rank r takes
    the slice [(a * world + r) * batch, ... + batch) of them."""

    def __init__(self, n: int, batch: int, accum: int, world: World, seed: int, start: int):
        self.n, self.batch, self.accum, self.world, self.seed, self.start = n, batch, accum, world, seed, start

    def permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        global_batch = self.batch * self.accum * self.world.size
        pos, cached = self.start, {}
        while True:
            for a in range(self.accum):
                first = pos + (a * self.world.size + self.world.rank) * self.batch
                idx = []
                for g in range(first, first + self.batch):
                    epoch = g // self.n
                    if epoch not in cached:
                        cached = {epoch: self.permutation(epoch)}
                    idx.append(cached[epoch][g % self.n])
                yield idx
            pos += global_batch


def make_loader(ds: data.ConversationDataset | data.PairDataset, cfg: Config, world: World, tokenizer: Tokenizer,
                start: int):
    sampler = StreamSampler(len(ds), cfg.train.batch_size, cfg.train.grad_accum, world, cfg.train.seed, start)
    pack, max_len, multiple = cfg.data.pack, cfg.data.max_len, cfg.data.pad_multiple
    if isinstance(ds, data.PairDataset):
        def collate(items):
            return data.collate_pairs(items, tokenizer.pad_id)
    else:
        def collate(items):
            return data.collate(items, tokenizer.pad_id, pack, max_len, multiple)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=world.device.type == "cuda",
        collate_fn=collate, generator=torch.Generator())  # own generator: making it must not draw from the global RNG


def cache_folder(cfg: Config, path: str) -> Path | None:
    """Where the feature cache of a data file lives: one subfolder per file, named after it."""
    return Path(cfg.data.feature_cache) / Path(path).stem if cfg.data.feature_cache else None


def make_dataset(cfg: Config, path: str, tokenizer: Tokenizer, aligner: Aligner,
                 use_cache: bool = True) -> data.ConversationDataset | data.PairDataset:
    """A data file as the config says: K tokens per media, max_len, truncation, on_error, paths, and the feature
    cache (checked against this aligner's weights); in Phase 1, a pair file."""
    if cfg.train.phase == "align":
        return data.PairDataset(path, tokenizer, aligner.config, cfg.data.max_len, cfg.data.on_error,
                                cfg.data.allow_outside_paths)
    cache = cache_folder(cfg, path) if use_cache else None
    return data.ConversationDataset(path, tokenizer, aligner.config, cfg.model.tokens_per_media, cfg.data.max_len,
                                    cfg.data.truncate, cfg.data.on_error, cfg.data.allow_outside_paths, cache,
                                    weights_hash(aligner) if cache else None, cfg.data.max_audio_windows)


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps. A pure function of the step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Each parameter group's learning rate to `factor` times its peak."""
    for g in opt.param_groups:
        g["lr"] = g["peak"] * factor


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, fsynced, renamed into place; `latest` names the newest


@dataclass
class TrainState:
    """Where a run stands; with the weights, optimizer and RNGs, what a checkpoint restores."""
    step: int = 0  # optimizer steps taken
    consumed: int = 0  # samples of the global stream consumed (a skipped step's samples too)
    best: float = float("inf")  # best validation loss so far
    bad_steps: int = 0  # non-finite steps skipped in all
    bad_in_row: int = 0  # ... in a row, up to now (not saved: a resumed run starts counting again)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(OSError):
    """A checkpoint or the run's folder could not be written (read-only or full folder, a file in its place); the
    previous checkpoint is untouched."""


class CheckpointReadError(ValueError):
    """A checkpoint's files cannot be read (truncated, garbage, keys missing): with train.resume = "auto" an older
    one is tried."""


def write_folder(final: Path, write, advice: str = "The previous checkpoint is intact; free space or make "
                 "run.out_dir writable, then resume") -> None:
    """`write(tmp)` fills a temporary folder beside `final`, whose files (in subfolders too) are fsynced, and the
    folder then takes `final`'s place by renames: a crash at any moment leaves the old folder or the new one whole.
    A folder that cannot be written is a CheckpointWriteError ending with `advice`, and the old one stays."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        for f in sorted(tmp.rglob("*"), reverse=True):  # files and subfolders before the folders that hold them
            if f.is_dir():
                fsync_dir(f)
            else:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write {final}: {e}. {advice}") from None
    except BaseException:  # Ctrl-C in an export, say: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def write_checkpoint(ckpt_dir: Path, name: str, tensors: dict[str, torch.Tensor], optimizer: dict, scaler,
                     state: dict, rngs: list) -> Path:
    """Write checkpoint `name` (the trainable tensors, the optimizer's state as `optimizer_state` gives it, the
    scaler's, the run's and every rank's RNGs) atomically (`write_folder`), then replace `latest` (os.replace is
    atomic) to name it, except for `best`, which is a copy kept aside."""
    def write(tmp: Path) -> None:
        save_tensors(tensors, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer, "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rngs, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    final = ckpt_dir / name
    write_folder(final, write)
    if name != "best":
        latest_tmp = ckpt_dir / f".latest-{os.getpid()}"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, ckpt_dir / "latest")
    fsync_dir(ckpt_dir)
    return final


def save_checkpoint(name: str, run: TrainState, model: MultimodalLM, opt, scaler, world: World, cfg: Config,
                    epoch_size: int, collective: bool = True) -> None:
    """Checkpoint `name` of the run (rank 0 writes; every rank's RNG state goes in), then drop old periodic ones.
    `collective=False` (after an exception) lets rank 0 save alone, without the other ranks' RNG states, since a
    collective could hang on a failed peer."""
    if not collective and is_sharded(model):  # FSDP: gathering the shards needs every rank
        print(f"rank {world.rank}: no emergency checkpoint alone under FSDP (its shards are gathered by all ranks); "
              "the last checkpoint stands", flush=True)
        return
    rngs = [rng_state()] + [None] * (world.size - 1)
    if world.size > 1 and collective:
        dist.all_gather_object(rngs, rng_state())
    tensors, optimizer = trainable_state(model), optimizer_state(model, opt)  # under FSDP, gathered by all ranks
    if world.master:
        ckpt_dir = Path(cfg.run.out_dir) / "checkpoints"
        state = {"step": run.step, "consumed": run.consumed, "epoch": run.consumed // epoch_size, "best": run.best,
                 "bad_steps": run.bad_steps, "world_size": world.size, "lr_factor": lr_factor(run.step, cfg.train),
                 "llm_config": dataclasses.asdict(model.llm.config), "config": dataclasses.asdict(cfg)}
        write_checkpoint(ckpt_dir, name, tensors, optimizer, scaler, state, rngs)
        if isinstance(model, align.AlignModel) and name != "best":  # Phase 1's result, as of this checkpoint
            write_folder(Path(cfg.run.out_dir) / "aligner", lambda tmp: align.save_result(model, tmp, cfg.model.llm))
        if name.startswith("step_"):
            for old in sorted(ckpt_dir.glob("step_*"))[:-cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if world.size > 1 and collective:
        dist.barrier()


def clean_leftovers(ckpt_dir: Path) -> None:
    """Remove half-written folders of an earlier crash (they never carry a `latest` name)."""
    for p in ckpt_dir.glob(".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> int:
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except Exception:
        return -1


def resume_candidates(cfg: Config) -> list[Path]:
    """The checkpoints to resume from, best first: the one `train.resume` names; with "auto" the one `latest`
    names, then the other complete ones of out_dir, newest first (a crash may have taken `latest`'s folder, and a
    damaged checkpoint gives way to an older one)."""
    if cfg.train.resume == "none":
        return []
    if cfg.train.resume != "auto":
        p = Path(cfg.train.resume)
        if not (p / "state.json").is_file():
            raise FileNotFoundError(f"{p}: not a checkpoint folder (no state.json); give a checkpoints/step_* folder")
        return [p]
    return checkpoints_in(Path(cfg.run.out_dir) / "checkpoints")


def checkpoints_in(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints of a run's folder: the one `latest` names first, then the others, newest first."""
    if not ckpt_dir.is_dir():
        return []
    complete = sorted((p for p in ckpt_dir.glob("[!.]*") if (p / "state.json").is_file()), key=checkpoint_step,
                      reverse=True)
    latest = ckpt_dir / "latest"
    first = ckpt_dir / latest.read_text().strip() if latest.is_file() else None
    return sorted(complete, key=lambda p: p != first)  # stable: `latest` first, then newest first


def find_resume(cfg: Config) -> Path | None:
    return next(iter(resume_candidates(cfg)), None)


RESUME_HINT = "Resume from an older one with --train.resume=PATH, or start fresh with --train.resume=none"


def read_checkpoint(path: Path, *names: str, hint: str = RESUME_HINT) -> list:
    """state.json and the named files of a checkpoint (`trainable.safetensors`, `optimizer.pt`, `rng.pt`), read
    whole before anything is restored; a file that cannot be read is a CheckpointReadError naming it, and ending
    with `hint`, what to do instead (the calling tool's own options)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        missing = [k for k in ("step", "consumed", "best", "bad_steps") if k not in state]
        if missing:
            raise KeyError(f"state.json lacks {missing}")
        files = [load_file(str(path / n)) if n.endswith(".safetensors") else
                 torch.load(path / n, map_location="cpu", weights_only=False) for n in names]
    except Exception as e:
        raise CheckpointReadError(f"{path}: checkpoint cannot be read ({type(e).__name__}: {e}); it may be "
                                  f"truncated. {hint}") from None
    return [state, *files]


def restore_trainable(path: Path, state: dict, tensors: dict[str, torch.Tensor], model: MultimodalLM,
                      instead: str = "--train.resume=none") -> None:
    """Copy a checkpoint's trainable tensors into `model` after checking that it was trained on this base model,
    with this LoRA scale, and that every tensor fits; a mismatch is a ValueError naming what differs, and offering
    `instead` (the calling tool's option) as the way out."""
    saved_llm = state.get("llm_config")
    if saved_llm is not None and saved_llm != json.loads(json.dumps(dataclasses.asdict(model.llm.config))):
        diff = sorted(k for k in saved_llm if saved_llm[k] != getattr(model.llm.config, k, None))
        raise ValueError(f"{path}: checkpoint was trained on a different base model (config differs in {diff}); "
                         f"use the model.llm it was trained with, or {instead}")
    alphas = {m.alpha for m in lora.lora_modules(model.llm).values()}
    saved_alpha = state.get("config", {}).get("lora", {}).get("alpha")
    if saved_alpha is not None and alphas and alphas != {saved_alpha}:
        raise ValueError(f"{path}: checkpoint was trained with lora.alpha = {saved_alpha}, this run has "
                         f"{sorted(alphas)}: its adapters would be scaled wrongly; use lora.alpha = {saved_alpha}, "
                         f"or {instead}")
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_tensors({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in tensors.items()},
                  f"{path}: checkpoint does not fit this run (different LoRA rank/targets, base model or projectors?); "
                  f"use the config it was trained with, or {instead}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(shard_of(p, tensors[k].to(p.device)))


def load_checkpoint(path: Path, model: MultimodalLM, opt, scaler, world: World) -> TrainState:
    """Restore trainable tensors, optimizer state, scaler and this rank's RNGs; check that the checkpoint fits this
    run first. The optimizer's hyperparameters stay this run's (the schedule sets the learning rate)."""
    state, tensors, other, rngs = read_checkpoint(path, "trainable.safetensors", "optimizer.pt", "rng.pt")
    restore_trainable(path, state, tensors, model)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        load_optimizer_state(model, opt, other["optimizer"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: the optimizer state does not fit this run ({e}); resume with the config it was "
                         "trained with, or start fresh with --train.resume=none") from None
    for g, h in zip(opt.param_groups, hyper):
        g.update(h)
    scaler.load_state_dict(other["scaler"])
    if world.rank < len(rngs) and rngs[world.rank] is not None:  # else (a new rank, a rank-0-only save) a fresh seed
        set_rng_state(rngs[world.rank])
    return TrainState(state["step"], state["consumed"], state["best"], state["bad_steps"])


# ----------------------------------------------------------------------------------------------------------------
# Metrics: metrics.csv and metrics.jsonl, one row per logged step and per eval, written by rank 0

# the groups of samples whose loss is logged apart (Batch.groups, PairBatch.groups), and what a step counts
GROUPS = {"instruct": ("text", "image", "audio"), "align": tuple(f"{a}_{b}" for a, b in data.PAIR_KINDS)}
UNITS = {"instruct": "tokens", "align": "pairs"}
RECALLS = [f"r{k}_{x}_{y}" for k in (1, 5) for a, b in data.PAIR_KINDS for x, y in ((a, b), (b, a))]


def metric_fields(phase: str) -> list[str]:
    unit = UNITS[phase]
    return ["step", "epoch", "split", "loss", *(f"loss_{g}" for g in GROUPS[phase]), "lr", "grad_norm", unit,
            f"{unit}_per_s", "step_time", "peak_mem_gib", *(["accuracy"] if phase == "instruct" else RECALLS),
            "bad_steps", "skipped_samples"]


class Metrics:
    def __init__(self, out_dir: Path, enabled: bool, fields: list[str]):
        self.enabled, self.fields = enabled, fields
        if enabled:
            new = not (out_dir / "metrics.csv").exists()
            self.csv_file = open(out_dir / "metrics.csv", "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, fields)
            if new:
                self.csv.writeheader()
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def log(self, row: dict) -> None:
        if self.enabled:
            self.csv.writerow({k: row.get(k, "") for k in self.fields})
            self.jsonl.write(json.dumps(row) + "\n")
            self.csv_file.flush()
            self.jsonl.flush()


def group_sums(out: LossOutput, groups: torch.Tensor) -> torch.Tensor:
    """(6,): summed loss and count of each of the batch's 3 groups of samples (`groups` (3, S) bool)."""
    sums = [torch.where(groups, x, 0.0).sum(1) for x in (out.sample_loss, out.sample_tokens)]  # no host read
    return torch.stack(sums, 1).flatten()


def group_losses(sums: torch.Tensor, phase: str) -> dict:
    """Mean loss per group from `group_sums` (None where the batch had none of that group)."""
    return {f"loss_{g}": (sums[2 * j] / sums[2 * j + 1]).item() if sums[2 * j + 1] > 0 else None
            for j, g in enumerate(GROUPS[phase])}


def peak_memory_gib(device: torch.device) -> float:
    """The GPU's peak allocated memory, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 5400 \
        else f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------------------
# Eval: validation loss (all and per modality) and exact-match accuracy of greedy answers


def normalize_answer(text: str) -> str:
    """What exact-match accuracy compares: the answer without surrounding space, in lower case."""
    return text.strip().lower()


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


@torch.compiler.set_stance("force_eager")  # compiled layers run eager here: the shapes change from call to call
@torch.no_grad()
def evaluate(model: MultimodalLM, ds: data.ConversationDataset, cfg: Config, world: World, tokenizer: Tokenizer,
             autocast) -> dict:
    """Validation loss (all and per kind of sample) and the exact-match accuracy of greedy answers, over all ranks:
    {"loss", "loss_text", "loss_image", "loss_audio", "accuracy", "correct", "answered"}."""
    model.eval()
    # under FSDP every rank runs every forward and decode step, since the ranks gather each layer's weights
    # together: each runs as many batches as the rank with the most (a spare one on a sample whose result is
    # dropped), and generation runs all max_new_tokens steps, the answers cut at the stop tokens after
    sharded = is_sharded(model)
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    mine = list(range(world.rank, n, world.size))
    rounds = range(0, -(-n // world.size), cfg.train.batch_size)
    sums = torch.zeros(6, device=world.device)  # loss and tokens of text-only, image, audio samples
    loss_sum = torch.zeros(2, device=world.device)
    for s in rounds:
        idx = mine[s:s + cfg.train.batch_size]
        if not idx and not sharded:
            break
        batch = data.collate([ds[i] for i in idx or [0]], tokenizer.pad_id, pad_multiple=cfg.data.pad_multiple)
        with autocast():
            out = model(batch.to(world.device))
        if idx:
            sums += group_sums(out, batch.groups().to(world.device))
            loss_sum += torch.stack([out.sample_loss.sum(), out.sample_tokens.sum()])
    all_sum(sums, world)
    all_sum(loss_sum, world)
    row = {"loss": (loss_sum[0] / loss_sum[1]).item(), **group_losses(sums, "instruct")}
    correct = torch.zeros(2, device=world.device)
    n_gen = min(len(ds), cfg.train.gen_samples)
    gen = list(range(world.rank, n_gen, world.size))
    if sharded:
        model.unshard()  # generation calls the model's parts directly, past the hooks that gather their weights
    for s in range(0, -(-n_gen // world.size), cfg.train.batch_size):
        pairs = [p for p in map(ds.prompt, gen[s:s + cfg.train.batch_size]) if p is not None]
        if not pairs and not sharded:
            continue
        spare = pairs or [next(p for p in map(ds.prompt, range(len(ds))) if p is not None)]
        batch = data.collate([p for p, _ in spare], tokenizer.pad_id).to(world.device)
        with autocast():
            outs = model.generate(batch, cfg.train.max_new_tokens, stop_ids=() if sharded else tokenizer.stop_ids)
        for o, (_, answer) in zip(outs, pairs):
            o = next((o[:j] for j, t in enumerate(o) if t in tokenizer.stop_ids), o)
            correct[0] += normalize_answer(tokenizer.decode(o)) == normalize_answer(answer)
            correct[1] += 1
    if sharded:
        model.reshard()
    all_sum(correct, world)
    row["correct"], row["answered"] = int(correct[0]), int(correct[1])
    row["accuracy"] = row["correct"] / row["answered"] if row["answered"] else None
    model.train()
    return row


@torch.no_grad()
def evaluate_align(model: align.AlignModel, ds: data.PairDataset, cfg: Config, world: World, tokenizer: Tokenizer,
                   autocast) -> dict:
    """Phase 1's validation, over all ranks: the contrastive loss with the whole validation set as one batch (all
    and per kind of pair), and recall@1 and @5 in both directions of each kind ("r1_image_text": image -> text)."""
    model.eval()
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    share = -(-n // world.size)  # pairs per rank, the last ones repeated to make the shares equal
    mine = [min(i, n - 1) for i in range(world.rank * share, (world.rank + 1) * share)]
    sides, keys = [], []
    for s in range(0, len(mine), cfg.train.batch_size):
        items = [ds[i] for i in mine[s:s + cfg.train.batch_size]]
        batch = data.collate_pairs(items, tokenizer.pad_id).to(world.device)
        with autocast():
            left, right = model.embed(batch)
        sides.append(torch.cat([left, right, batch.kind[:, None].float()], 1))  # (b, 2D + 1)
        keys += [it.keys for it in items]
    rows = torch.cat(sides)
    if world.size > 1:
        rows = GatherRows.apply(rows, world)
        all_keys = [None] * world.size
        dist.all_gather_object(all_keys, keys)
        keys = [k for part in all_keys for k in part]
    D = model.aligner.config.dim
    left, right, kind = rows[:n, :D], rows[:n, D:2 * D], rows[:n, 2 * D].long()
    losses = align.contrastive_loss(left, right, kind, model.scale())  # (n,)
    ones = torch.ones_like(losses)
    sums = group_sums(LossOutput(losses.sum(), ones.sum(), losses, ones), data.kind_groups(kind))
    model.train()
    return {"loss": losses.mean().item(), **group_losses(sums, "align"),
            **align.retrieval_metrics(left, right, kind, keys[:n])}


def eval_summary(row: dict) -> str:
    """The log line's part of an eval row: accuracy, or Phase 1's recall@1 in each direction."""
    if "accuracy" in row:
        return "accuracy " + ("n/a" if row["accuracy"] is None else
                              f"{100 * row['accuracy']:.1f}% ({row['correct']}/{row['answered']})")
    recalls = [f"{k[3:].replace('_', '->')} {100 * v:.0f}%" for k, v in row.items() if k.startswith("r1_")]
    return "recall@1 " + ", ".join(recalls)


# ----------------------------------------------------------------------------------------------------------------
# The training step


def make_optimizer(model: MultimodalLM | align.AlignModel, cfg: TrainConfig):
    """Fused AdamW over the trainable parameters: projectors and LoRA, each with its own learning rate; in Phase 1
    the aligner's trainable part, the text head and the temperature."""
    if isinstance(model, align.AlignModel):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr_aligner,
                   "peak": cfg.lr_aligner}]
    else:
        groups = [{"params": list(model.projectors.parameters()), "lr": cfg.lr_projector, "peak": cfg.lr_projector},
                  {"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": cfg.lr_lora,
                   "peak": cfg.lr_lora}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
    return opt, [p for g in groups for p in g["params"]]


def mixed_precision(cfg: TrainConfig, device: torch.device):
    """(GradScaler, autocast): bf16 autocast on GPU by default, fp16 with a scaler, fp32 on CPU. `autocast()`
    makes the context (`autocast(cache_enabled=False)` one without autocast's cache of cast weights)."""
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                                 enabled=amp != "fp32")
    return scaler, autocast


def store_for_autocast(frozen: nn.Module, autocast) -> None:
    """Store a frozen module's matmul weights (the weights and biases of its linear and convolution layers) in
    autocast's dtype. Autocast casts them to that dtype at every call, so the module's outputs under autocast are
    bit-identical and the fp32 copies were memory only (0.16 GiB for an 86M-parameter aligner). Norms, embeddings
    and positions stay fp32, as autocast runs their ops in fp32. From then on the module runs under autocast only;
    its weights on disk stay the truth (`export` copies them from there)."""
    if not autocast.keywords["enabled"]:
        return
    for m in frozen.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.to(autocast.keywords["dtype"])


def data_parallel(model: MultimodalLM, world: World) -> nn.Module:
    """The model as the step calls it: wrapped in DDP under torchrun, as it is on one process or sharded (FSDP)."""
    if world.size == 1 or is_sharded(model):  # FSDP2 syncs its own gradients
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda"
                                               else None)


class StepOutput(NamedTuple):
    """A step's results, on the device: nothing in a step waits for the GPU."""
    stats: torch.Tensor  # (7,): loss sum, then loss and labelled tokens of text-only, image, audio samples
    n_tokens: torch.Tensor  # (): labelled tokens of the step on all ranks
    grad_norm: torch.Tensor  # (): before clipping
    finite: torch.Tensor  # () bool: the loss and the gradient norm were finite on every rank (else no update)


def forward_backward(model: nn.Module, micro: list[data.Batch], scaler, autocast, world: World
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step over its micro-batches: (stats (7,), labelled tokens).

    Each micro-batch's summed loss is divided by the labelled tokens of the whole step on all ranks (times the
    world size, since the gradients are averaged over the ranks, after the last micro-batch only:
    `gradient_sync`). Every trainable parameter gets a gradient, zero for those the micro-batch does not reach
    (`idle_parameters`): DDP and FSDP expect one from every parameter at every step. The count the loss is divided
    by is `Batch.count` (labelled tokens) or `PairBatch.count` (pairs)."""
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    n_tok = all_sum(sum(b.count() for b in micro), world)
    stats = torch.zeros(7, device=world.device)
    for i, b in enumerate(micro):
        with gradient_sync(model, i == len(micro) - 1), autocast():
            out = model(b)
            unused = sum(0.0 * p.sum() for p in idle_parameters(raw, b))
            loss = (out.loss_sum + unused) * world.size / n_tok
        scaler.scale(loss).backward()
        stats[0] += out.loss_sum.detach().float()
        stats[1:] += group_sums(out, b.groups())
    return stats, n_tok


def idle_parameters(model: MultimodalLM | align.AlignModel, b: data.Batch | data.PairBatch) -> list[nn.Parameter]:
    """The trainable parameters a micro-batch does not reach: the projector (Phase 2) or tower (Phase 1) of a
    modality it lacks."""
    if isinstance(model, align.AlignModel):
        present, parts = set(b.media) | ({"text"} if b.text_ids is not None else set()), model.towers()
    else:
        present, parts = set(b.media), model.projectors
    return [p for m, part in parts.items() if m not in present for p in part.parameters() if p.requires_grad]


def update(opt, scaler, params: list[nn.Parameter], grad_clip: float, stats: torch.Tensor, world: World
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients and step AdamW, unless the loss or the gradient norm is NaN/Inf on any rank; then the
    step is skipped on the device (fused AdamW's `found_inf`); with fp16 the scaler skips overflowing steps
    itself. Returns the gradient norm and `finite`."""
    scaler.unscale_(opt)
    grad_norm = whole(nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    all_sum(stats, world)  # a non-finite loss on any rank makes the sum non-finite on every rank
    # the same on every rank without another collective: the summed loss and the all-reduced gradients agree
    finite = torch.isfinite(stats[0]) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        opt.found_inf = (~finite).float()  # read by fused AdamW: no update, no step count
        opt.step()
        del opt.found_inf
    return grad_norm, finite


def train_step(model: nn.Module, micro: list[data.Batch], opt, scaler, params: list[nn.Parameter], autocast,
               world: World, grad_clip: float) -> StepOutput:
    """One optimizer step over its micro-batches (already on the device), with no host read."""
    stats, n_tok = forward_backward(model, micro, scaler, autocast, world)
    return StepOutput(stats, n_tok, *update(opt, scaler, params, grad_clip, stats, world))


def make_step(model: MultimodalLM, opt, scaler, params: list[nn.Parameter], autocast, world: World, cfg: Config):
    """The training step that `fit` and bench.py run: `train_step` (through DDP under torchrun), or with
    train.cuda_graph the same step recorded as CUDA graphs (`GraphedStep`)."""
    if cfg.train.cuda_graph:
        return GraphedStep(model, opt, scaler, params, autocast, world, cfg.train.grad_clip, cfg.data.pad_multiple)
    ddp = data_parallel(model, world)
    return functools.partial(train_step, ddp, opt=opt, scaler=scaler, params=params, autocast=autocast, world=world,
                             grad_clip=cfg.train.grad_clip)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class StopRequest:
    """SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) set a flag; at the end of each step all ranks agree (any rank's flag
    stops all) and save an emergency checkpoint. A second Ctrl-C exits at once. `restore` puts the previous
    handlers back."""

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, log):
        self.flag, self.log = False, log
        self.previous = {s: signal.signal(s, self.handle) for s in self.signals}

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            self.log("Ctrl-C: stopping after this step with an emergency checkpoint (Ctrl-C again to exit at once)")
        self.flag = True

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLock:
    """An exclusive lock on a run's folder, so that two runs never share it: `fcntl.flock` on `<out_dir>/run.lock`,
    which names the holder's host and PID. The system drops the lock when the process ends, so a crashed run
    leaves none behind."""

    def __init__(self, out_dir: Path):
        import fcntl
        import socket

        self.file = open(out_dir / "run.lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(f"{out_dir} is in use by another run ({holder}); wait for it to end, or give this "
                               "run another run.out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock


def resolved_paths(cfg: Config) -> Config:
    """The config with its model and data paths absolute, as config.json records it (so that the run's folder can
    be used from anywhere: generate.load_run)."""
    cfg = copy.deepcopy(cfg)
    for section, key in (("model", "llm"), ("model", "aligner"), ("data", "train_file"), ("data", "val_file"),
                         ("data", "make_demo"), ("data", "feature_cache")):
        if getattr(getattr(cfg, section), key):
            setattr(getattr(cfg, section), key, str(Path(getattr(getattr(cfg, section), key)).resolve()))
    return cfg


def prepare_out_dir(cfg: Config, world: World) -> RunLock | None:
    """Rank 0 makes out_dir and locks it, clears half-written checkpoints of a crash, writes config.json and the
    demo's assets if asked; the other ranks wait for it, and all stop if it could not. Returns rank 0's lock."""
    lock, error = None, None
    if world.master:
        out_dir = Path(cfg.run.out_dir)
        try:
            (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = CheckpointWriteError(f"cannot use run.out_dir = {str(out_dir)!r} ({type(e).__name__}: {e}); "
                                         "give a folder this process can write to")
        try:
            if error is None:
                lock = RunLock(out_dir)
                clean_leftovers(out_dir / "checkpoints")
                write_json(out_dir / "config.json", dataclasses.asdict(resolved_paths(cfg)))
                if cfg.data.make_demo:  # Phase 2 on the demo needs its aligner from Phase 1
                    demo.ensure_demo(cfg.data.make_demo, phase1=cfg.train.phase == "instruct", device=world.device)
        except Exception as e:
            error = e
            if lock is not None:
                lock.release()
    if any_rank(error is not None, world):
        raise error or RuntimeError(f"rank 0 could not prepare run.out_dir = {cfg.run.out_dir!r}; its error says why")
    return lock


def load_datasets(cfg: Config, tokenizer: Tokenizer, aligner: Aligner, world: World, log):
    """The training and validation sets, and how many samples they skipped (listed in skipped.jsonl)."""
    train_ds = make_dataset(cfg, cfg.data.train_file, tokenizer, aligner)
    val_ds = make_dataset(cfg, cfg.data.val_file, tokenizer, aligner) if cfg.data.val_file else None
    skipped = train_ds.skipped + (val_ds.skipped if val_ds else [])
    if world.master and skipped:
        path = Path(cfg.run.out_dir) / "skipped.jsonl"
        data.write_skipped(path, skipped)
        log(f"skipped {len(skipped)} bad samples; reasons in {path}")
    return train_ds, val_ds, len(skipped)


def list_skipped(micro: list[data.Batch], seen: set[tuple], out_dir: Path, world: World) -> None:
    """Samples that failed to decode (on_error = "skip": others took their place) go to skipped.jsonl, once
    each, each rank writing its own."""
    bad = [s for b in micro for s in b.skipped if (s["file"], s["line"]) not in seen]
    if bad:
        seen |= {(s["file"], s["line"]) for s in bad}
        data.write_skipped(out_dir / "skipped.jsonl", bad)
        print(f"rank {world.rank}: skipped {len(bad)} sample(s) that failed to decode, first "
              f"{bad[0]['file']}:{bad[0]['line']}: {bad[0]['reason']}", flush=True)


def train_row(run: TrainState, out: StepOutput, opt, elapsed: float, tokens: int, skipped: int, epoch_size: int,
              world: World, cfg: Config) -> dict:
    """The metrics row of the last step (its loss; speed over the steps since the last row), printed by rank 0."""
    unit = UNITS[cfg.train.phase]
    row = {"step": run.step, "epoch": run.consumed / epoch_size, "split": "train",
           "loss": (out.stats[0] / out.n_tokens).item(), "lr": float(opt.param_groups[-1]["lr"]),
           "grad_norm": out.grad_norm.item(), unit: int(out.n_tokens.item()), f"{unit}_per_s": tokens / elapsed,
           "step_time": elapsed / cfg.run.log_every, "peak_mem_gib": round(peak_memory_gib(world.device), 3),
           "bad_steps": run.bad_steps, "skipped_samples": skipped, **group_losses(out.stats[1:], cfg.train.phase)}
    if world.master:
        eta = (cfg.train.max_steps - run.step) * row["step_time"]
        speed = f"{row[f'{unit}_per_s']:,.0f} {'tok' if unit == 'tokens' else unit}/s"
        print(f"step {run.step:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {speed} | "
              f"ETA {duration(eta)} | {'mem' if world.device.type == 'cuda' else 'host mem'} "
              f"{row['peak_mem_gib']:.2f} GiB")
    return row


def fit(cfg: Config, world: World | None = None) -> dict:
    """Train as the config says (resuming where `train.resume` points) and export the result; returns the last
    logged row, with "step" and "stopped" (by a signal). `world` defaults to torchrun's processes."""
    world = world or setup_distributed(cfg)
    lock = prepare_out_dir(cfg, world)
    stop = StopRequest(print if world.master else (lambda *a, **k: None))
    try:
        return train_loop(cfg, world, stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def train_loop(cfg: Config, world: World, stop: StopRequest) -> dict:
    """`fit` inside its locked run folder, with signals caught."""
    out_dir, ckpt_dir = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "checkpoints"
    log = print if world.master else (lambda *a, **k: None)

    tokenizer, model = build_model(cfg, world.device, world=world)
    phase1 = isinstance(model, align.AlignModel)
    if phase1 and world.size > 1:
        model.gather = functools.partial(gather_rows, world=world)  # negatives from every rank
    log(parameter_report(parameter_groups(model)))
    train_ds, val_ds, skipped = load_datasets(cfg, tokenizer, model.aligner, world, log)
    opt, params = make_optimizer(model, cfg.train)
    scaler, autocast = mixed_precision(cfg.train, world.device)
    if not phase1:  # after the datasets checked their feature cache against the aligner's fp32 weights
        store_for_autocast(model.aligner, autocast)
    run, candidates = None, resume_candidates(cfg)
    for path in candidates:
        try:
            run = load_checkpoint(path, model, opt, scaler, world)
        except CheckpointReadError as e:
            if cfg.train.resume != "auto" or path == candidates[-1]:  # none left to fall back on
                raise
            log(f"skipping a checkpoint that cannot be read: {e}")
            continue
        log(f"resumed from {path} at step {run.step} (global sample {run.consumed})")
        break
    if run is None:
        run = TrainState()
        torch.manual_seed(cfg.train.seed + world.rank)  # dropout differs across ranks, the same on every run
    step_fn = make_step(model, opt, scaler, params, autocast, world, cfg)  # after a resume: graphs keep its state
    model.train()
    metrics = Metrics(out_dir, world.master, metric_fields(cfg.train.phase))
    bad_seen: set[tuple] = set()  # samples that failed to decode during training, on this rank
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world.size

    save = functools.partial(save_checkpoint, run=run, model=model, opt=opt, scaler=scaler, world=world, cfg=cfg,
                             epoch_size=len(train_ds))  # save("step_0000100"): what the run is at, as it is then
    loader = iter(make_loader(train_ds, cfg, world, tokenizer, run.consumed))
    t_last, tokens_since, last_row = time.perf_counter(), 0, {}
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        while run.step < cfg.train.max_steps:
            set_lr(opt, lr_factor(run.step, cfg.train))
            micro = [next(loader) for _ in range(cfg.train.grad_accum)]
            list_skipped(micro, bad_seen, out_dir, world)
            tokens_since += sum(len(b.ids) if phase1 else sum(b.lengths) for b in micro) * world.size  # all processed
            out = step_fn([b.to(world.device) for b in micro])
            finite = bool(out.finite)
            run.consumed += global_batch  # after the step: a crash inside it re-reads its samples on resume
            if finite:
                run.step, run.bad_in_row = run.step + 1, 0
            else:
                run.bad_in_row, run.bad_steps = run.bad_in_row + 1, run.bad_steps + 1
                log(f"step {run.step}: non-finite loss or gradient norm; step skipped ({run.bad_in_row} in a row)")
            opt.zero_grad(set_to_none=True)
            if run.bad_in_row >= cfg.train.max_bad_steps:
                save("emergency")
                raise RuntimeError(f"{run.bad_in_row} non-finite steps in a row (max_bad_steps = "
                                   f"{cfg.train.max_bad_steps}): the loss or the gradients overflow. Emergency "
                                   f"checkpoint in {ckpt_dir / 'emergency'}; lower the learning rates, use amp = bf16 "
                                   "or fp32, or check the data")
            last = run.step == cfg.train.max_steps
            if finite and (run.step % cfg.run.log_every == 0 or last):
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                skipped_now = skipped + int(all_sum(torch.tensor(float(len(bad_seen)), device=world.device), world))
                last_row = train_row(run, out, opt, time.perf_counter() - t_last, tokens_since, skipped_now,
                                     len(train_ds), world, cfg)
                metrics.log(last_row)
                t_last, tokens_since = time.perf_counter(), 0
            if finite and val_ds is not None and (last or cfg.train.eval_every
                                                  and run.step % cfg.train.eval_every == 0):
                row = (evaluate_align if phase1 else evaluate)(model, val_ds, cfg, world, tokenizer, autocast)
                metrics.log({"step": run.step, "epoch": run.consumed / len(train_ds), "split": "val", **row})
                log(f"eval step {run.step} | val loss {row['loss']:.4f} | {eval_summary(row)}")
                last_row = {**last_row, "val": row}
                if row["loss"] < run.best:
                    run.best = row["loss"]
                    save("best")
                t_last = time.perf_counter()
            if any_rank(stop.flag, world):
                save("emergency")
                log(f"stop requested: emergency checkpoint at step {run.step} in {ckpt_dir / 'emergency'}")
                return {**last_row, "stopped": True, "step": run.step}
            if finite and (last or cfg.train.save_every and run.step % cfg.train.save_every == 0):
                save(f"step_{run.step:07d}")
    except Exception as e:
        if run.step > 0 and not isinstance(e, CheckpointWriteError):  # weights and optimizer are whole between steps
            with contextlib.suppress(Exception):
                save("emergency", collective=False)
        raise
    if phase1:
        log(f"Phase 1's aligner (for Phase 2's model.aligner) is in {out_dir / 'aligner'}")
    elif cfg.train.strategy == "fsdp":  # the merged LLM would not fit one rank: export it from the checkpoint
        log(f"export: python generate.py --run {out_dir} --export {out_dir / 'export'} (loads the base on one device "
            "or the CPU)")
    elif world.master:
        export(model, out_dir / "export", cfg)
        log(f"exported the adapter (peft format), the merged LLM, projectors and aligner to {out_dir / 'export'}")
    return {**last_row, "stopped": False, "step": run.step}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def check_export_folder(folder: Path) -> None:
    """A ValueError unless `folder` may take an export: new, empty, or an export folder (which is replaced)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file; give a folder for the export")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "mmlora.json").is_file():
        raise ValueError(f"{folder}: holds files and is not an export folder (no mmlora.json); give a new or empty "
                         "folder, so that nothing there is overwritten")


def export(model: MultimodalLM, folder: Path, cfg: Config, dtype: torch.dtype | None = None) -> None:
    """The run's result as one folder that transformers, peft and mmlora load:

    adapter/                 peft's format; base_model_name_or_path is the base's absolute path
    merged/                  the LLM with LoRA folded in, a Hugging Face folder (sharded at 5 GB, with its tokenizer
                             and generation config): AutoModelForCausalLM.from_pretrained loads it
    projectors.safetensors   the trained projectors
    aligner/                 a copy of the frozen aligner, read from its folder (model.aligner)
    mmlora.json              the run's config, for `generate.load_run(folder)`

    The model itself is not changed (the merge is computed aside), `dtype` casts the merged weights. The folder is
    written beside `folder` under a temporary name, then takes its place (`write_folder`): an export folder already
    there is replaced whole, never mixed with the new one. A file, or a folder that holds anything but an export,
    is refused (ValueError) before anything is written. Files are readable by all."""
    check_export_folder(folder)
    base = Path(cfg.model.llm).resolve()

    def write(tmp: Path) -> None:
        lora.save_adapter(model.llm, tmp / "adapter", str(base))
        save_llm(model.llm, tmp / "merged", state=lora.merged_state_dict(model.llm, dtype))
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / "merged" / name)
                os.chmod(tmp / "merged" / name, 0o644)
        save_tensors(model.projectors.state_dict(), tmp / "projectors.safetensors")
        copy_aligner(cfg.model.aligner, tmp / "aligner")  # its folder, not the model's copy: see store_for_autocast
        doc = {"format": "mmlora export 1", "llm": "merged", "aligner": "aligner",
               "projectors": "projectors.safetensors", "base_model": str(base), "config": dataclasses.asdict(cfg)}
        write_json(tmp / "mmlora.json", doc)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_folder(folder, write, advice="An export folder already there is intact; free space or give a writable "
                 "folder")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Any config key can be overridden: --section.key=value")
    ap.add_argument("--config", help="TOML config (configs/*.toml)")
    ap.add_argument("--build_feature_cache", action="store_true",
                    help="compute the aligner's features of data.train_file and data.val_file into data.feature_cache, "
                         "then exit")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    try:
        if args.build_feature_cache:
            build_cache(cfg)
            return
        result = fit(cfg)
    except (ValueError, FileNotFoundError, CheckpointWriteError) as e:  # bad input: a sample, a file, a checkpoint,
        print(f"error: {e}", file=sys.stderr, flush=True)  # a setup; each names what is at fault and what to do
        sys.exit(2)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result.get("stopped"):
        sys.exit(1)


def build_cache(cfg: Config) -> None:
    if not cfg.data.feature_cache:
        sys.exit("config error: set data.feature_cache to the folder for the cache")
    if cfg.data.make_demo:
        demo.ensure_demo(cfg.data.make_demo)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    tokenizer = load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    aligner = load_aligner(cfg.model.aligner, device)
    for path in (cfg.data.train_file, cfg.data.val_file):
        if path:
            ds = make_dataset(cfg, path, tokenizer, aligner, use_cache=False)
            folder = cache_folder(cfg, path)
            n = data.build_feature_cache(ds, aligner, folder, device, num_workers=cfg.data.num_workers)
            print(f"cached aligner features of {n} samples of {path} in {folder}")


# ----------------------------------------------------------------------------------------------------------------
# The whole-step CUDA graph (train.cuda_graph): an opt-in wrapper around the step above, for GPUs


class GraphedStep:
    """`forward_backward` + `update` recorded as one CUDA graph per batch shape and replayed.

    A replay is one launch for the whole step (forward, backward, clipping, AdamW), where the step otherwise
    costs the host thousands of kernel launches. What recording asks, all here:
    - few shapes: each batch is padded by `Batch.pad_static` (rows to `pad_multiple`, labelled positions and media
      to few counts, at weight 0), since every shape is a graph of its own; at most `max_graphs` are recorded and
      the others run as they are;
    - no host reads and fixed addresses: the learning rates live in device tensors that the replays read (the
      schedule's value is copied in before each step), AdamW is `capturable`, autocast keeps no cache of cast
      weights, and fp16's loss scaling (which reads the host) is refused (`check_config`);
    - under torchrun, no DDP: its hooks cannot be recorded, so the step averages the gradients itself with one
      all-reduce, recorded in each rank's graph (`average_gradients`).
    The first step of a shape runs as it is (it compiles the layers and sets up the optimizer state), the second
    is recorded and replayed, and later ones copy their batch into the recorded inputs and replay. All graphs
    share one memory pool: their outputs are valid until the next step."""

    max_graphs = 16

    def __init__(self, model: MultimodalLM, opt, scaler, params: list[nn.Parameter], autocast, world: World,
                 grad_clip: float, pad_multiple: int):
        if world.device.type != "cuda":
            raise ValueError("train.cuda_graph records the step on a GPU; on CPU set it to false")
        self.model, self.opt, self.scaler, self.params, self.world = model, opt, scaler, params, world
        self.autocast, self.grad_clip, self.pad_multiple = autocast, grad_clip, pad_multiple
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[data.Batch], StepOutput]] = {}
        self.seen: set[tuple] = set()
        self.told = False  # that the shapes outnumber max_graphs
        self.pool = None
        self.side = torch.cuda.Stream()
        self.lrs = [torch.tensor(0.0, device=world.device) for _ in opt.param_groups]  # read by the replays
        for m in lora.lora_modules(model).values():
            m.recompute_dropout = True  # in compiled layers; memory the recorded step gets for free (`lora_down`)
        for g in opt.param_groups:
            g["capturable"] = True

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Refuse what cannot be recorded, naming the key."""
        if cfg.train.compile in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"train.cuda_graph records the whole step, so the layers cannot record graphs of their "
                             f"own (train.compile = \"{cfg.train.compile}\" records them): use \"default\" or "
                             "\"max-autotune-no-cudagraphs\" (or none) with it")
        if cfg.train.amp == "fp16":
            raise ValueError("train.cuda_graph cannot record fp16's loss scaling (it reads the host); use amp = bf16")
        if cfg.data.pack:
            raise ValueError("train.cuda_graph needs batches of few shapes, and packed rows vary in number: "
                             "set data.pack = false with it")
        if cfg.train.phase == "align":
            raise ValueError("train.cuda_graph records Phase 2's step; set it to false with train.phase = \"align\"")

    def step(self, micro: list[data.Batch]) -> StepOutput:
        """The step as it is recorded: `train_step` with the gradients averaged by hand instead of by DDP."""
        stats, n_tok = forward_backward(self.model, micro, self.scaler, lambda: self.autocast(cache_enabled=False),
                                        self.world)
        if self.world.size > 1:
            average_gradients(self.params, self.world)
        return StepOutput(stats, n_tok, *update(self.opt, self.scaler, self.params, self.grad_clip, stats,
                                                self.world))

    def run(self, micro: list[data.Batch]) -> StepOutput:
        """Run or record the step with the learning rates as device tensors, then give the groups their floats."""
        floats = [g["lr"] for g in self.opt.param_groups]
        for g, lr in zip(self.opt.param_groups, self.lrs):
            g["lr"] = lr
        try:
            return self.step(micro)
        finally:
            for g, lr in zip(self.opt.param_groups, floats):
                g["lr"] = lr

    def __call__(self, micro: list[data.Batch]) -> StepOutput:
        for g, lr in zip(self.opt.param_groups, self.lrs):
            lr.fill_(g["lr"])  # the schedule's value, for the replay (or the run) below
        micro = [b.pad_static(self.pad_multiple) for b in micro]
        key = tuple(tuple(t.shape) for b in micro for t in b.tensors())
        if key in self.graphs:
            graph, inputs, outputs = self.graphs[key]
            for static, b in zip(inputs, micro):
                for s, t in zip(static.tensors(), b.tensors()):
                    s.copy_(t, non_blocking=True)
            graph.replay()
            return outputs
        full = len(self.graphs) == self.max_graphs
        if key not in self.seen or full:  # warm-up, on a side stream as capture asks
            if full and not self.told:
                print(f"train.cuda_graph: {self.max_graphs} batch shapes are recorded; new ones run unrecorded, "
                      "slower (a larger data.pad_multiple makes fewer shapes)", flush=True)
                self.told = True
            self.seen.add(key)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                outputs = self.run(micro)
            torch.cuda.current_stream().wait_stream(self.side)
            return outputs
        inputs = [b.apply(torch.clone) for b in micro]
        self.opt.zero_grad(set_to_none=True)  # the graph's backward writes the gradients it allocates
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile, which is harmless
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.run(inputs)
        except Exception as e:
            raise RuntimeError(f"recording the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "train with train.cuda_graph = false") from e
        self.pool = graph.pool()
        self.graphs[key] = graph, inputs, outputs
        graph.replay()
        return outputs


def average_gradients(params: list[nn.Parameter], world: World) -> None:
    """DDP's average of the gradients over the ranks, as one all-reduce of all of them flattened."""
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world.size
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 (train.strategy = "fsdp"): the LLM's weights sharded over the ranks with torch's `fully_shard`
#
# Each decoder layer is one unit: its weights live as row shards (dim 0) on the ranks, are gathered just before the
# layer runs and freed after (forward and backward), and its LoRA gradients are reduce-scattered back to the shards.
# The rest of the model (embeddings, final norm, lm_head, projectors) is the root unit, gathered for the whole
# forward. The aligner stays whole on every rank and frozen. Frozen base weights and fp32 LoRA share a unit: the
# mixed-precision policy gathers both in the base's dtype, and reduces gradients in fp32 into the fp32 shards that
# AdamW updates. Checkpoints hold whole tensors (`trainable_state`, `optimizer_state`), so they resume under either
# strategy, on any number of ranks.


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
    """Whether `model` was made an FSDP2 unit (`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_rows(t: torch.Tensor) -> tuple[int, int]:
    """(first row, rows) of this rank's shard of a parameter: FSDP2 cuts dim 0 into world-size chunks of
    ceil(n / world) rows, the last ones shorter or empty."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) or t.dim() == 0:
        return 0, t.shape[0] if t.dim() else 0
    chunk = -(-t.shape[0] // t.device_mesh.size())
    return t.device_mesh.get_local_rank() * chunk, t.to_local().shape[0]


def shard_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor of `param`'s shape) as `param` holds it: this rank's rows as a DTensor like it, or
    whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or full.dim() == 0:
        return full
    first, rows = shard_rows(param)
    return DTensor.from_local(full[first:first + rows].contiguous(), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def read_shards(llm: LLM, files: list[Path]) -> None:
    """Each rank copies its rows of every base weight from the safetensors files (one file at a time, only those
    rows read), after checking the files' names and shapes against the model's."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    params = {n.replace(".base_layer.", "."): p for n, p in llm.named_parameters() if ".lora_" not in n}
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


if __name__ == "__main__":
    main()

"""Training of mmlora, both phases in one torchrun-driven DDP loop: Phase 2 (train.phase = "instruct") trains
projectors + LoRA on multimodal conversations; Phase 1 (train.phase = "align", align.py) trains the aligner on
image-text, audio-text and image-audio pairs.

    python train.py --config configs/demo.toml                                  # one process (CPU or one GPU)
    python train.py --config configs/demo-align.toml                            # Phase 1 -> <out_dir>/aligner/
    torchrun --nproc_per_node=8 train.py --config configs/qwen2.5-0.5b.toml     # DDP; or: bash launch.sh CONFIG
    python train.py --config configs/demo.toml --train.max_steps=20 --run.out_dir=runs/x   # overrides

Read top to bottom: model -> data stream -> schedule -> checkpoints -> metrics -> eval -> the step -> the loop
(`fit`). What the loop leans on lives in files named for it: config.py (the TOML sections and their checks),
distributed.py (ranks, collectives, DDP and FSDP2's sharding, train.strategy = "fsdp"), checkpoint.py (the run
folder: lock, checkpoints, restore, export) and step_graph.py (the whole step as CUDA graphs, train.cuda_graph,
an opt-in wrapper around `train_step`).
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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention.flex_attention import BlockMask

import align
import data
import dpo
import lora
from checkpoint import (CheckpointReadError, CheckpointWriteError, RunLock, Start, TrainState, clean_leftovers, export,
                        load_checkpoint, optimizer_state, read_start, resume_candidates, rng_state, trainable_state,
                        write_checkpoint, write_folder)
from config import Config, TrainConfig, load_config
from distributed import (GatherRows, World, all_sum, any_rank, average_gradients, data_parallel, gather_rows,
                         gradient_sync, is_sharded, materialize_sharded, read_shards, setup_distributed, whole)
from model import (MODALITIES, LLM, Aligner, LossOutput, MultimodalLM, Projector, Tokenizer, check_tensors,
                   cross_entropy_chunk, document_block_mask, document_mask, llm_skeleton, load_aligner, load_llm,
                   load_tokenizer, parameter_report, until_stop, weights_hash, write_json)
from quant import NF4Linear, load_llm_nf4
from step_graph import GraphedStep

# ----------------------------------------------------------------------------------------------------------------
# The model: built whole on each rank (ddp), or sharded over the ranks as it is read (fsdp; distributed.py)


def build_model(cfg: Config, device: torch.device, adapters: bool = True, world: World | None = None,
                tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, MultimodalLM | align.AlignModel]:
    """Tokenizer (`tokenizer` if one was loaded already), LLM (frozen, with LoRA unless `adapters` is False), frozen
    aligner and projectors, as the config says; in Phase 1 (train.phase = "align") the aligner to train, on the
    frozen LLM (`align.AlignModel`). With train.strategy = "fsdp", the model sharded over `world`
    (`build_sharded`)."""
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
        return tokenizer, align.AlignModel(aligner, llm, cfg.train.align_encoders).to(device)
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
    on top of train.init_from's start where one is given (`start_from`); set activation checkpointing and
    compilation. With train.objective = "dpo" the projectors are frozen: the reference model shares them."""
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
        targets = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
        lora.apply_lora(llm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
    else:
        llm.requires_grad_(False)
    lora.fuse_qkv(llm)
    llm.gradient_checkpointing = cfg.train.activation_checkpointing
    llm.offload_activations = cfg.train.offload_activations
    model = MultimodalLM(llm, aligner, projectors, media_ids, cfg.model.loss_chunk)
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
    params = list(model.llm.parameters())
    # an NF4 weight is buffers, not a parameter: a meta tensor of its shape counts it as frozen
    nf4 = [torch.empty(m.out_features, m.in_features, device="meta") for m in model.llm.modules()
           if isinstance(m, NF4Linear)]
    # the run's adapters; a frozen start adapter inside them (train.init_from) counts as part of the frozen LLM
    adapters = {id(p) for m in lora.outer_lora_modules(model.llm).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    return {"aligner": list(model.aligner.parameters()), "projectors": list(model.projectors.parameters()),
            "llm": [p for p in params if id(p) not in adapters] + nf4, "lora": [p for p in params if id(p) in adapters]}


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
    elif isinstance(ds, data.PreferenceDataset):
        def collate(items):
            return data.collate_preferences(items, tokenizer.pad_id, multiple)
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
    cache (checked against this aligner's weights); in Phase 1, a pair file; with train.objective = "dpo", a
    preference file."""
    if cfg.train.phase == "align":
        return data.PairDataset(path, tokenizer, aligner.config, cfg.data.max_len, cfg.data.on_error,
                                cfg.data.allow_outside_paths)
    cache = cache_folder(cfg, path) if use_cache else None
    kind = data.PreferenceDataset if cfg.train.objective == "dpo" else data.ConversationDataset
    return kind(path, tokenizer, aligner.config, cfg.model.tokens_per_media, cfg.data.max_len, cfg.data.truncate,
                cfg.data.on_error, cfg.data.allow_outside_paths, cache, weights_hash(aligner) if cache else None,
                cfg.data.max_audio_windows)


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
# Checkpoints of the run (checkpoint.py writes and reads them)


def save_checkpoint(name: str, run: TrainState, model: MultimodalLM, opt, scaler, world: World, cfg: Config,
                    epoch_size: int, collective: bool = True, start_hash: str | None = None) -> None:
    """Checkpoint `name` of the run (rank 0 writes; every rank's RNG state goes in), then drop old periodic ones.
    `collective=False` (after an exception) lets rank 0 save alone, without the other ranks' RNG states, since a
    collective could hang on a failed peer. `start_hash`: train.init_from's (`Start.hash`), which a resume checks."""
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
        if start_hash is not None:
            state["start_hash"] = start_hash
        write_checkpoint(ckpt_dir, name, tensors, optimizer, scaler, state, rngs)
        if isinstance(model, align.AlignModel) and name != "best":  # Phase 1's result, as of this checkpoint
            write_folder(Path(cfg.run.out_dir) / "aligner", lambda tmp: align.save_result(model, tmp, cfg.model.llm))
        if name.startswith("step_"):
            for old in sorted(ckpt_dir.glob("step_*"))[:-cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if world.size > 1 and collective:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Metrics: metrics.csv and metrics.jsonl, one row per logged step and per eval, written by rank 0

# what a run trains (`objective`): the groups of samples whose loss is logged apart (Batch.groups, PairBatch.groups,
# PreferenceBatch.groups), what a step counts, and what else its rows hold
GROUPS = {"instruct": ("text", "image", "audio"), "align": tuple(f"{a}_{b}" for a, b in data.PAIR_KINDS),
          "dpo": dpo.GROUPS}
UNITS = {"instruct": "tokens", "align": "pairs", "dpo": "pairs"}
RECALLS = [f"r{k}_{x}_{y}" for k in (1, 5) for a, b in data.PAIR_KINDS for x, y in ((a, b), (b, a))]
EXTRA = {"instruct": ["accuracy"], "align": RECALLS, "dpo": ["accuracy", *dpo.metric_names()]}


def objective(cfg: Config) -> str:
    """What the run trains: "align" (Phase 1), "instruct" (Phase 2's SFT) or "dpo" (Phase 2 on preferences)."""
    return "align" if cfg.train.phase == "align" else "dpo" if cfg.train.objective == "dpo" else "instruct"


def metric_fields(kind: str) -> list[str]:
    unit = UNITS[kind]
    return ["step", "epoch", "split", "loss", *(f"loss_{g}" for g in GROUPS[kind]), "lr", "grad_norm", unit,
            f"{unit}_per_s", "step_time", "peak_mem_gib", *EXTRA[kind], "bad_steps", "skipped_samples"]


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
    return torch.stack(sums, 1).flatten().detach()


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


def eager_layers(fn):
    """`fn` with compiled layers run eager: evaluation's shapes change from call to call. Where nothing imported
    the compiler, nothing was compiled, and importing train.py leaves it out."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)
    return run


@eager_layers
@torch.no_grad()
def evaluate(model: MultimodalLM, ds: data.ConversationDataset, cfg: Config, world: World, tokenizer: Tokenizer,
             autocast) -> dict:
    """Validation loss (all and per kind of sample) and the exact-match accuracy of greedy answers, over all ranks:
    {"loss", "loss_text", "loss_image", "loss_audio", "accuracy", "correct", "answered"}; on a preference set the
    DPO loss and rewards (`dpo.metrics`), and the accuracy of the answers against the chosen ones."""
    model.eval()
    # under FSDP every rank runs every forward and decode step, since the ranks gather each layer's weights
    # together: each runs as many batches as the rank with the most (a spare one on a sample whose result is
    # dropped), and generation runs all max_new_tokens steps, the answers cut at the stop tokens after
    sharded = is_sharded(model)
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    mine = list(range(world.rank, n, world.size))
    rounds = range(0, -(-n // world.size), cfg.train.batch_size)
    sums = torch.zeros(6 if not isinstance(ds, data.PreferenceDataset) else dpo.STATS, device=world.device)
    loss_sum = torch.zeros(2, device=world.device)
    for s in rounds:
        idx = mine[s:s + cfg.train.batch_size]
        if not idx and not sharded:
            break
        items = [ds[i] for i in idx or [0]]
        if isinstance(ds, data.PreferenceDataset):  # DPO: the preference loss and rewards of the pairs (dpo.py)
            batch = data.collate_preferences(items, tokenizer.pad_id, cfg.data.pad_multiple).to(world.device)
            with autocast():
                policy, reference, tokens = dpo.logps(model, model, batch)
            if idx:
                sums += dpo.pair_terms(policy.float(), reference.float(), tokens, batch.groups(), cfg.train)[2]
            continue
        batch = data.collate(items, tokenizer.pad_id, pad_multiple=cfg.data.pad_multiple)
        with autocast():
            out = model(batch.to(world.device))
        if idx:
            sums += group_sums(out, batch.groups().to(world.device))
            loss_sum += torch.stack([out.sample_loss.sum(), out.sample_tokens.sum()])
    all_sum(sums, world)
    all_sum(loss_sum, world)
    if isinstance(ds, data.PreferenceDataset):
        row = dpo.metrics(sums, cfg.train)
    else:
        row = {"loss": (loss_sum[0] / loss_sum[1]).item(), **group_losses(sums, "instruct")}
    correct = torch.zeros(2)
    n_gen = min(len(ds), cfg.train.gen_samples)
    gen = list(range(world.rank, n_gen, world.size))
    if sharded:
        model.unshard()  # generation calls the model's parts directly, past the hooks that gather their weights
        for s in range(0, -(-n_gen // world.size), cfg.train.batch_size):
            pairs = [p for p in map(ds.prompt, gen[s:s + cfg.train.batch_size]) if p is not None]
            spare = pairs or [next(p for p in map(ds.prompt, range(len(ds))) if p is not None)]
            batch = data.collate([p for p, _ in spare], tokenizer.pad_id).to(world.device)
            with autocast():
                outs = model.generate(batch, cfg.train.max_new_tokens, stop_ids=())
            for o, (_, answer) in zip(outs, pairs):
                correct += score(o, answer, tokenizer)
        model.reshard()
    else:  # generate.py --predict's path: batches of similar length, prompts made in workers, recorded decode steps
        # and continuous batching on a GPU (the loader draws no number from the run's RNG: resuming after an
        # evaluation draws the same masks)
        prompts = data.prompt_batches(ds, gen, 256, 1 << 16, cfg.train.max_new_tokens, tokenizer.pad_id,
                                      world.device, cfg.data.num_workers)
        with autocast(cache_enabled=False):  # a recording keeps no cast weights between replays
            for answered in model.answer_batches(((answers, batch) for _, answers, _, batch in prompts
                                                  if batch is not None), cfg.train.max_new_tokens,
                                                 tokenizer.stop_ids, rows=256, slots=1 << 16,
                                                 **recorded_decoder(model.llm)):
                for answer, o in answered:
                    correct += score(o, answer, tokenizer)
    correct = all_sum(correct.to(world.device), world)
    row["correct"], row["answered"] = int(correct[0]), int(correct[1])
    row["accuracy"] = row["correct"] / row["answered"] if row["answered"] else None
    model.train()
    return row


def score(tokens: list[int], answer: str, tokenizer: Tokenizer) -> torch.Tensor:
    """(1 if the answer, cut at its first stop token, is the reference under `normalize_answer`, else 0; 1)."""
    tokens = until_stop(tokens, tokenizer.stop_ids)
    return torch.tensor([float(normalize_answer(tokenizer.decode(tokens)) == normalize_answer(answer)), 1.0],
                        device=torch.device("cpu"))


def recorded_decoder(llm: LLM) -> dict:
    """`LLM.generate`'s decoder for evaluation: on a GPU the eager decode steps recorded as CUDA graphs, the model
    as it is (decode.GraphDecoder(prepare=False)); made anew for each evaluation, so that its caches and graphs are
    freed with it. On a CPU, or for a sliding-window model, the plain steps."""
    if not llm.lm_head.weight.is_cuda or llm.config.sliding_window is not None:
        return {}
    from decode import GraphDecoder  # Triton and the compiler's modules, imported only on a GPU

    return {"decoder": GraphDecoder(llm, compile=False, prepare=False)}


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
        rewards = row.get("rewards/accuracies")
        return "accuracy " + ("n/a" if row["accuracy"] is None else
                              f"{100 * row['accuracy']:.1f}% ({row['correct']}/{row['answered']})") + \
            ("" if rewards is None else f", reward accuracy {100 * rewards:.1f}%")
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
        groups = [{"params": [p for p in model.projectors.parameters() if p.requires_grad], "lr": cfg.lr_projector,
                   "peak": cfg.lr_projector},
                  {"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": cfg.lr_lora,
                   "peak": cfg.lr_lora}]
        groups = [g for g in groups if g["params"]]  # (DPO freezes the projectors)
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
               world: World, grad_clip: float, average: bool = False, gradients=forward_backward) -> StepOutput:
    """One optimizer step over its micro-batches (already on the device), with no host read. `average`: the
    gradients are averaged over the ranks here, by one all-reduce (a step recorded as a CUDA graph, which cannot
    hold DDP's hooks), not by DDP. `gradients`: `forward_backward`, or DPO's (`dpo.forward_backward`)."""
    stats, n_tok = gradients(model, micro, scaler, autocast, world)
    if average and world.size > 1:
        average_gradients(params, world)
    return StepOutput(stats, n_tok, *update(opt, scaler, params, grad_clip, stats, world))


def make_step(model: MultimodalLM, opt, scaler, params: list[nn.Parameter], autocast, world: World, cfg: Config):
    """The training step that `fit` and bench.py run: `train_step` (through DDP under torchrun), or with
    train.cuda_graph the same step recorded as CUDA graphs (`GraphedStep`), with its own gradient average and
    autocast without its cache of cast weights (a recorded step keeps no state between replays)."""
    if cfg.train.cuda_graph:
        step = functools.partial(train_step, model, opt=opt, scaler=scaler, params=params,
                                 autocast=lambda: autocast(cache_enabled=False), world=world,
                                 grad_clip=cfg.train.grad_clip, average=True)
        return GraphedStep(step, model, opt, world.device, cfg.data.pad_multiple)
    ddp = data_parallel(model, world)
    gradients = functools.partial(dpo.forward_backward, cfg=cfg.train) if cfg.train.objective == "dpo" \
        else forward_backward
    return functools.partial(train_step, ddp, opt=opt, scaler=scaler, params=params, autocast=autocast, world=world,
                             grad_clip=cfg.train.grad_clip, gradients=gradients)


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


def resolved_paths(cfg: Config) -> Config:
    """The config with its model and data paths absolute, as config.json records it (so that the run's folder can
    be used from anywhere: generate.load_run)."""
    cfg = copy.deepcopy(cfg)
    for section, key in (("model", "llm"), ("model", "aligner"), ("data", "train_file"), ("data", "val_file"),
                         ("data", "make_demo"), ("data", "feature_cache"), ("train", "init_from")):
        if getattr(getattr(cfg, section), key):
            setattr(getattr(cfg, section), key, str(Path(getattr(getattr(cfg, section), key)).resolve()))
    return cfg


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def make_demo(folder: str, phase1: bool, device: torch.device) -> None:
    """`data.make_demo`: the demo's assets in `folder` (with `phase1`, its aligner too) unless they are there, made by
    `python demo.py` in a process of its own, on `device`, outside torchrun's group. The demo sits above training
    (its Phase 1 is a run of this file's loop), so this file starts it and never imports it."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    cmd = [sys.executable, str(Path(__file__).with_name("demo.py")), folder, "--device", str(device)]
    done = subprocess.run(cmd + ["--phase1"] * phase1, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"demo.py could not make the demo in {folder} (exit code {done.returncode}); its output "
                           "above says why. Run the command again to continue where it stopped")


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
                    make_demo(cfg.data.make_demo, phase1=cfg.train.phase == "instruct", device=world.device)
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
    kind = objective(cfg)
    unit = UNITS[kind]
    row = {"step": run.step, "epoch": run.consumed / epoch_size, "split": "train", "loss": None,
           "lr": float(opt.param_groups[-1]["lr"]),
           "grad_norm": out.grad_norm.item(), unit: int(out.n_tokens.item()), f"{unit}_per_s": tokens / elapsed,
           "step_time": elapsed / cfg.run.log_every, "peak_mem_gib": round(peak_memory_gib(world.device), 3),
           "bad_steps": run.bad_steps, "skipped_samples": skipped}
    row.update(dpo.metrics(out.stats, cfg.train) if kind == "dpo" else
               {"loss": (out.stats[0] / out.n_tokens).item(), **group_losses(out.stats[1:], kind)})
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
    kind = objective(cfg)
    metrics = Metrics(out_dir, world.master, metric_fields(kind))
    bad_seen: set[tuple] = set()  # samples that failed to decode during training, on this rank
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world.size

    save = functools.partial(save_checkpoint, run=run, model=model, opt=opt, scaler=scaler, world=world, cfg=cfg,
                             epoch_size=len(train_ds),  # save("step_0000100"): what the run is at, as it is then
                             start_hash=read_start(cfg.train.init_from).hash if cfg.train.init_from else None)
    if kind == "dpo" and run.step == 0 and val_ds is not None:  # the start's figures, which DPO is to improve on
        row = evaluate(model, val_ds, cfg, world, tokenizer, autocast)
        metrics.log({"step": 0, "epoch": 0.0, "split": "val", **row})
        log(f"eval step 0 (the start) | val loss {row['loss']:.4f} | {eval_summary(row)}")
    loader = iter(make_loader(train_ds, cfg, world, tokenizer, run.consumed))
    t_last, tokens_since, last_row = time.perf_counter(), 0, {}
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        while run.step < cfg.train.max_steps:
            set_lr(opt, lr_factor(run.step, cfg.train))
            micro = [next(loader) for _ in range(cfg.train.grad_accum)]
            list_skipped(micro, bad_seen, out_dir, world)
            tokens_since += sum(len(b.ids) if UNITS[kind] == "pairs" else sum(b.lengths)
                                for b in micro) * world.size  # all processed
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
        make_demo(cfg.data.make_demo, phase1=True, device=torch.device("cpu"))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    tokenizer = load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    aligner = load_aligner(cfg.model.aligner, device)
    for path in (cfg.data.train_file, cfg.data.val_file):
        if path:
            ds = make_dataset(cfg, path, tokenizer, aligner, use_cache=False)
            folder = cache_folder(cfg, path)
            n = data.build_feature_cache(ds, aligner, folder, device, num_workers=cfg.data.num_workers)
            print(f"cached aligner features of {n} samples of {path} in {folder}")


if __name__ == "__main__":
    main()

"""Phase-2 training of mmlora: projectors + LoRA on multimodal conversations, in one torchrun-driven DDP loop.

    python train.py --config configs/demo.toml                                  # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py --config configs/qwen2.5-0.5b.toml     # DDP; or: bash launch.sh CONFIG
    python train.py --config configs/demo.toml --train.max_steps=20 --run.out_dir=runs/x   # overrides

Read top to bottom: config -> model -> data stream -> checkpoints -> metrics -> eval -> the loop (`train`).
Every optimizer step consumes `batch_size * grad_accum * world_size` samples of one global stream (epoch-seeded
permutations, concatenated), so the data position is one number and a resume on any number of ranks continues
from the same global sample. The loss of a step is summed over tokens and divided by the labelled tokens of the
whole step on all ranks, so 1 rank and N ranks with the same global batch compute the same gradient.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import lora
import model as M

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass per TOML section; every key has a default and a comment


@dataclass
class ModelConfig:
    llm: str = ".cache/demo/llm"  # Hugging Face folder of the LLM (config.json, safetensors, tokenizer.json)
    aligner: str = ".cache/demo/aligner"  # Phase-1 aligner folder (aligner.json + aligner.safetensors)
    chat_format: str = ""  # "" = from tokenizer_config.json's template or the family; or chatml, qwen2.5, llama3, ...
    dtype: str = "auto"  # frozen LLM weights: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16
    image_tokens: int = 16  # K: LLM tokens per image
    audio_tokens: int = 8  # K: LLM tokens per audio clip
    projector_hidden: int = 0  # width of the projector's middle layer; 0 = the LLM's hidden size
    projector_mode: str = "pool"  # pool: N encoder tokens pooled to K; pooled: the pooled embedding repeated K times
    loss_chunk: int = 4096  # labelled positions per lm_head chunk in the loss


@dataclass
class LoRAConfig:
    rank: int = 16  # r
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the LoRA input
    targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names, or all-linear


@dataclass
class DataConfig:
    train: str = ".cache/demo/data/train.jsonl"  # JSONL or JSON list of conversations
    val: str = ".cache/demo/data/val.jsonl"  # validation set ("" = none)
    make_demo: str = ""  # folder in which to make the embedded demo assets on first use ("" = never)
    max_len: int = 512  # tokens per sample (and per packed row)
    truncate: bool = False  # cut samples longer than max_len (never inside a media block) instead of an error
    pack: bool = False  # pack several samples per row, with no attention across them
    on_error: str = "raise"  # bad sample: raise (stop, naming it) or skip (leave out, list in skipped.jsonl)
    allow_outside_paths: bool = False  # allow media paths outside the data file's folder
    feature_cache: str = ""  # folder of cached aligner features (train.py --build_feature_cache makes it)
    num_workers: int = 0  # DataLoader worker processes per rank
    pad_multiple: int = 8  # pad rows to a multiple of this many tokens (64 keeps compiled shapes few)


@dataclass
class TrainConfig:
    batch_size: int = 8  # samples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in all
    lr_projector: float = 1e-3  # peak learning rate of the projectors
    lr_lora: float = 2e-4  # peak learning rate of the LoRA adapters
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear warmup, then cosine decay to min_lr_ratio * peak
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    amp: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with GradScaler), fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant)
    compile: str = "none"  # torch.compile per decoder layer: none, default, reduce-overhead (CUDA graphs per layer),
    # max-autotune (searched Triton matmul kernels, CUDA graphs per layer), max-autotune-no-cudagraphs
    cuda_graph: bool = False  # each batch shape's whole step recorded as one CUDA graph and replayed (GPU, bf16/fp32)
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


CHOICES = {("model", "dtype"): ("auto", "float32", "bfloat16"), ("model", "projector_mode"): ("pool", "pooled"),
           ("data", "on_error"): ("raise", "skip"), ("train", "amp"): ("auto", "bf16", "fp16", "fp32"),
           ("train", "compile"): ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           ("run", "device"): ("auto", "cpu", "cuda")}
POSITIVE = {("lora", "rank"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "max_steps"),
            ("data", "max_len"), ("model", "image_tokens"), ("model", "audio_tokens"), ("model", "loss_chunk"),
            ("run", "log_every"), ("data", "pad_multiple"), ("train", "keep_last"), ("train", "max_bad_steps")}
NON_NEGATIVE = {("train", "lr_projector"), ("train", "lr_lora"), ("train", "weight_decay"), ("train", "warmup_steps"),
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
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio = {cfg.train.min_lr_ratio}; it must be in [0, 1]")
    if cfg.lora.dropout >= 1.0:
        raise ValueError(f"lora.dropout = {cfg.lora.dropout}; it must be in [0, 1)")
    if cfg.train.cuda_graph and cfg.train.compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.cuda_graph records the whole step, so the layers cannot record graphs of their own "
                         f"(train.compile = \"{cfg.train.compile}\" records them): use \"default\" or "
                         "\"max-autotune-no-cudagraphs\" (or none) with it")
    if cfg.train.cuda_graph and cfg.train.amp == "fp16":
        raise ValueError("train.cuda_graph cannot record fp16's loss scaling (it reads the host); use amp = bf16")
    if cfg.train.cuda_graph and cfg.data.pack:
        raise ValueError("train.cuda_graph needs batches of few shapes, and packed rows vary in number: "
                         "set data.pack = false with it")
    longest = max(cfg.model.image_tokens, cfg.model.audio_tokens)
    if cfg.data.max_len <= longest:
        raise ValueError(f"data.max_len = {cfg.data.max_len} cannot hold one media block of {longest} tokens "
                         "(model.image_tokens / model.audio_tokens); raise data.max_len")


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
        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: {section!r} must be a [section]; sections: model, lora, data, train, run")
            for key, value in values.items():
                set_key(cfg, section, key, value, path)
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
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Dist:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return Dist(rank, local, world, device)


def build_model(cfg: Config, device: torch.device) -> tuple[M.Tokenizer, M.MultimodalLM]:
    """Tokenizer, LLM (frozen, with LoRA), frozen aligner and projectors, as the config says."""
    tok = M.load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.model.dtype]
    llm = M.load_llm(cfg.model.llm, device, dtype)
    aligner = M.load_aligner(cfg.model.aligner, device)
    return tok, assemble(cfg, llm, aligner, {m: tok.media_token_id(m) for m in M.MODALITIES})


def assemble(cfg: Config, llm: M.LLM, aligner: M.Aligner, media_ids: dict[str, int]) -> M.MultimodalLM:
    """Add projectors and LoRA to a loaded LLM and aligner; set activation checkpointing and compilation."""
    torch.manual_seed(cfg.train.seed)  # the same projector and LoRA initialisation on every rank
    H, D = llm.config.hidden_size, aligner.config.dim
    K = {"image": cfg.model.image_tokens, "audio": cfg.model.audio_tokens}
    projectors = nn.ModuleDict({m: M.Projector(D, cfg.model.projector_hidden or H, H, K[m], cfg.model.projector_mode)
                                for m in M.MODALITIES}).to(llm.lm_head.weight.device)
    targets = cfg.lora.targets if cfg.lora.targets == "all-linear" else cfg.lora.targets.split(",")
    lora.apply_lora(llm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
    llm.gradient_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile != "none":  # one graph per layer, shared by all layers (same code, same shapes)
        dynamic = None
        if cfg.train.activation_checkpointing:  # static shapes: Inductor's partitioner fails on dynamic ones
            dynamic = False  # (torch 2.11); one compilation per batch shape, and not eager after Dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dropout through ATen's generator rather than Inductor's: the compiled layers draw eager's masks, and on an
        # H200 the step is 1.3% faster (ATen draws four numbers per Philox round, Inductor one)
        torch._inductor.config.fallback_random = True
        for layer in llm.model.layers:  # evaluation and generation run the layers eager (LLM.hidden_states)
            layer.compile(mode=None if cfg.train.compile == "default" else cfg.train.compile, dynamic=dynamic)
    return M.MultimodalLM(llm, aligner, projectors, media_ids, cfg.model.loss_chunk)


def parameter_groups(mm: M.MultimodalLM) -> dict[str, list[nn.Parameter]]:
    """The parts of the model as the parameter report shows them."""
    named = list(mm.llm.named_parameters())
    return {"aligner": list(mm.aligner.parameters()), "projectors": list(mm.projectors.parameters()),
            "llm": [p for n, p in named if ".lora_" not in n], "lora": [p for n, p in named if ".lora_" in n]}


def trainable_state(mm: M.MultimodalLM) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the trainable tensors (projectors + LoRA), by their names in the model."""
    return {n: p.detach() for n, p in mm.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------
# The data stream: epoch-seeded permutations, concatenated; step s owns samples [s*G, (s+1)*G)


class StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of indices) from global sample `start` on.

    Each optimizer step takes G = batch * accum * world samples of the stream; its micro-step a on rank r takes
    the slice [(a * world + r) * batch, ... + batch) of them."""

    def __init__(self, n: int, batch: int, accum: int, d: Dist, seed: int, start: int):
        self.n, self.batch, self.accum, self.d, self.seed, self.start = n, batch, accum, d, seed, start

    def permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        G = self.batch * self.accum * self.d.world
        pos, cached = self.start, {}
        while True:
            for a in range(self.accum):
                first = pos + (a * self.d.world + self.d.rank) * self.batch
                idx = []
                for g in range(first, first + self.batch):
                    epoch = g // self.n
                    if epoch not in cached:
                        cached = {epoch: self.permutation(epoch)}
                    idx.append(cached[epoch][g % self.n])
                yield idx
            pos += G


def make_loader(ds: data.ConversationDataset, cfg: Config, d: Dist, tok: M.Tokenizer, start: int):
    sampler = StreamSampler(len(ds), cfg.train.batch_size, cfg.train.grad_accum, d, cfg.train.seed, start)
    pack, max_len, multiple, static = cfg.data.pack, cfg.data.max_len, cfg.data.pad_multiple, cfg.train.cuda_graph
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda",
        collate_fn=lambda items: data.collate(items, tok.pad_id, pack, max_len, multiple, static),
        generator=torch.Generator())  # its own generator: creating the loader must not draw from the global RNG


def cache_folder(cfg: Config, split: str) -> Path | None:
    """Where the feature cache of a data file lives: one subfolder per file, named after it."""
    return Path(cfg.data.feature_cache) / Path(split).stem if cfg.data.feature_cache else None


def make_dataset(cfg: Config, path: str, tok: M.Tokenizer, aligner_config: M.AlignerConfig,
                 use_cache: bool = True) -> data.ConversationDataset:
    """A data file as the config says: K tokens per media, max_len, truncation, on_error, paths, feature cache."""
    K = {"image": cfg.model.image_tokens, "audio": cfg.model.audio_tokens}
    return data.ConversationDataset(path, tok, aligner_config, K, cfg.data.max_len, cfg.data.truncate,
                                    cfg.data.on_error, cfg.data.allow_outside_paths,
                                    cache_folder(cfg, path) if use_cache else None)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps. A pure function of the step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, fsynced, renamed into place; `latest` names the newest


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
    """A checkpoint could not be written (read-only or full folder); the previous one is untouched."""


def write_checkpoint(ckpt_dir: Path, name: str, mm: M.MultimodalLM, opt, scaler, state: dict, rngs: list) -> Path:
    """Write checkpoint `name` atomically: a crash at any moment leaves either the old or the new one whole.

    Files go to a temporary folder, are fsynced, and the folder is renamed into place; then `latest` is
    replaced (os.replace is atomic) to name it, except for `best`, which is a copy kept aside."""
    from safetensors.torch import save_file

    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous().cpu() for k, v in trainable_state(mm).items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rngs, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {name} in {ckpt_dir}: {e}. The previous checkpoint is "
                                   "intact; free space or make run.out_dir writable, then resume") from None
    final = ckpt_dir / name
    old = ckpt_dir / f".old-{name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    if name != "best":
        latest_tmp = ckpt_dir / f".latest-{os.getpid()}"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, ckpt_dir / "latest")
    fsync_dir(ckpt_dir)
    return final


def clean_leftovers(ckpt_dir: Path) -> None:
    """Remove half-written folders of an earlier crash (they never carry a `latest` name)."""
    for p in ckpt_dir.glob(".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def find_resume(cfg: Config) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume != "auto":
        p = Path(cfg.train.resume)
        if not (p / "state.json").is_file():
            raise FileNotFoundError(f"{p}: not a checkpoint folder (no state.json); give a checkpoints/step_* folder")
        return p
    ckpt_dir = Path(cfg.run.out_dir) / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.is_file():
        p = ckpt_dir / latest.read_text().strip()
        if (p / "state.json").is_file():
            return p
    # `latest` missing or naming a folder a crash took away: the newest complete checkpoint
    complete = [p for p in ckpt_dir.glob("[!.]*") if (p / "state.json").is_file()] if ckpt_dir.is_dir() else []
    return max(complete, key=lambda p: json.loads((p / "state.json").read_text())["step"], default=None)


def load_checkpoint(path: Path, mm: M.MultimodalLM, opt, scaler, d: Dist) -> dict:
    """Restore trainable tensors, optimizer and scaler; check that the checkpoint fits this run first."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        other = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        rngs = torch.load(path / "rng.pt", weights_only=False)
        state = json.loads((path / "state.json").read_text())
    except Exception as e:
        raise ValueError(f"{path}: checkpoint cannot be read ({type(e).__name__}: {e}); it may be truncated. "
                         "Resume from an older one with --train.resume=PATH, or start fresh with --train.resume=none"
                         ) from None
    saved_llm = state.get("llm_config")
    if saved_llm is not None and saved_llm != json.loads(json.dumps(dataclasses.asdict(mm.llm.config))):
        diff = sorted(k for k in saved_llm if saved_llm[k] != getattr(mm.llm.config, k, None))
        raise ValueError(f"{path}: checkpoint was trained on a different base model (config differs in {diff}); "
                         "use the model.llm it was trained with, or --train.resume=none")
    expected = trainable_state(mm)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or extra or wrong:
        raise ValueError(f"{path}: checkpoint does not fit this run (different LoRA rank/targets, base model or "
                         f"projectors?); missing: {missing[:4]}, unexpected: {extra[:4]}, wrong shape: {wrong[:4]}. "
                         "Use the config it was trained with, or --train.resume=none")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    opt.load_state_dict(other["optimizer"])
    for g in opt.param_groups:  # as make_optimizer sets them; a CUDA-graph run saved them as device tensors
        g["lr"], g["capturable"] = float(g["lr"]), False
    scaler.load_state_dict(other["scaler"])
    if d.rank < len(rngs) and rngs[d.rank] is not None:  # else (a new rank, a rank-0-only save) a fresh seed
        set_rng_state(rngs[d.rank])
    return state


# ----------------------------------------------------------------------------------------------------------------
# Metrics: metrics.csv and metrics.jsonl, one row per logged step and per eval, written by rank 0

METRIC_FIELDS = ["step", "epoch", "split", "loss", "loss_text", "loss_image", "loss_audio", "lr", "grad_norm",
                 "tokens", "tokens_per_s", "step_time", "peak_mem_gib", "accuracy", "bad_steps", "skipped_samples"]


class Metrics:
    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            new = not (out_dir / "metrics.csv").exists()
            self.csv_file = open(out_dir / "metrics.csv", "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, METRIC_FIELDS)
            if new:
                self.csv.writeheader()
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def log(self, row: dict) -> None:
        if self.enabled:
            self.csv.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
            self.jsonl.write(json.dumps(row) + "\n")
            self.csv_file.flush()
            self.jsonl.flush()


KINDS = ("text", "image", "audio")


def modality_sums(out: dict, modality: torch.Tensor) -> torch.Tensor:
    """(6,): summed loss and labelled tokens of the batch's samples that are text-only, hold an image, hold audio."""
    kinds = torch.stack([~modality.any(1), modality[:, 0], modality[:, 1]])  # (3, S)
    sums = [torch.where(kinds, out[k], 0.0).sum(1) for k in ("sample_loss", "sample_tokens")]  # no host read
    return torch.stack(sums, 1).flatten()


def modality_losses(sums: torch.Tensor) -> dict:
    """Mean loss per kind of sample from `modality_sums` (None where the batch had none of that kind)."""
    return {f"loss_{k}": (sums[2 * j] / sums[2 * j + 1]).item() if sums[2 * j + 1] > 0 else None
            for j, k in enumerate(KINDS)}


# ----------------------------------------------------------------------------------------------------------------
# Eval: validation loss (all and per modality) and exact-match accuracy of greedy answers


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is True on any; a single process needs no collective (and no host read)."""
    return flag if d.world == 1 else all_sum(torch.full((), float(flag), device=d.device), d).item() > 0


@torch.no_grad()
def evaluate(mm: M.MultimodalLM, ds: data.ConversationDataset, cfg: Config, d: Dist, tok: M.Tokenizer,
             autocast) -> dict:
    mm.eval()
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    mine = list(range(d.rank, n, d.world))
    sums = torch.zeros(6, device=d.device)  # loss and tokens of text-only, image, audio samples
    loss_sum = torch.zeros(2, device=d.device)
    for s in range(0, len(mine), cfg.train.batch_size):
        items = [ds[i] for i in mine[s:s + cfg.train.batch_size]]
        batch = to_device(data.collate(items, tok.pad_id, pad_multiple=cfg.data.pad_multiple), d.device)
        with autocast:
            out = mm(batch)
        sums += modality_sums(out, batch["modality"])
        loss_sum += torch.stack([out["sample_loss"].sum(), out["sample_tokens"].sum()])
    all_sum(sums, d)
    all_sum(loss_sum, d)
    row = {"loss": (loss_sum[0] / loss_sum[1]).item(), **modality_losses(sums)}
    correct = torch.zeros(2, device=d.device)
    gen = list(range(d.rank, min(len(ds), cfg.train.gen_samples), d.world))
    for s in range(0, len(gen), cfg.train.batch_size):
        pairs = [ds.prompt(i) for i in gen[s:s + cfg.train.batch_size]]
        batch = to_device(data.collate([p for p, _ in pairs], tok.pad_id), d.device)
        with autocast:
            outs = mm.generate(batch, cfg.train.max_new_tokens, stop_ids=tok.stop_ids)
        for o, (_, answer) in zip(outs, pairs):
            correct[0] += tok.decode(o).strip().lower() == answer.strip().lower()
            correct[1] += 1
    all_sum(correct, d)
    row["accuracy"] = (correct[0] / correct[1]).item() if correct[1] > 0 else None
    mm.train()
    return row


# ----------------------------------------------------------------------------------------------------------------
# The loop


def make_optimizer(mm: M.MultimodalLM, cfg: TrainConfig, device: torch.device):
    """Fused AdamW over the trainable parameters: projectors and LoRA, each with its own learning rate."""
    groups = [{"params": list(mm.projectors.parameters()), "lr": cfg.lr_projector, "peak": cfg.lr_projector},
              {"params": [p for p in mm.llm.parameters() if p.requires_grad], "lr": cfg.lr_lora, "peak": cfg.lr_lora}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
    return opt, [p for g in groups for p in g["params"]]


def mixed_precision(cfg: TrainConfig, device: torch.device):
    """(GradScaler, autocast context): bf16 autocast on GPU by default, fp16 with a scaler, fp32 on CPU."""
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=amp != "fp32", cache_enabled=False)  # no cast cache: CUDA graphs forbid it
    return scaler, autocast


def data_parallel(mm: M.MultimodalLM, d: Dist, cfg: TrainConfig) -> nn.Module:
    """The model as train_step calls it: DDP under torchrun, except with train.cuda_graph, whose step averages the
    gradients itself (`average_gradients`) so that the all-reduce is recorded with it; the model on one process."""
    if d.world == 1 or cfg.cuda_graph:
        return mm
    return nn.parallel.DistributedDataParallel(mm, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def average_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """DDP's average of the gradients over the ranks, as one all-reduce of all of them flattened."""
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= d.world
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def train_step(ddp, micro: list[dict], opt, scaler, params: list[nn.Parameter], autocast, d: Dist,
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over its micro-batches, with no host read: gradients, clipping, AdamW.

    Each micro-batch's summed loss is divided by the labelled tokens of the whole step on all ranks (times the
    world size, since the gradients are averaged over the ranks: by DDP, with `no_sync` on every micro-batch but
    the last, or, with train.cuda_graph, by `average_gradients` after the last). The step is
    skipped on the device (fused AdamW's `found_inf`) when the loss or the gradient norm is NaN/Inf on any rank;
    with fp16 the scaler skips overflowing steps itself. Returns stats (loss sum, then loss/tokens of text,
    image, audio samples), the labelled-token count, the gradient norm and `finite`, all on the device."""
    n_tok = all_sum(sum(b["label_weight"].sum() for b in micro), d)
    stats = torch.zeros(7, device=d.device)
    is_ddp = isinstance(ddp, nn.parallel.DistributedDataParallel)
    for i, b in enumerate(micro):
        sync = i == len(micro) - 1
        with (ddp.no_sync() if is_ddp and not sync else contextlib.nullcontext()), autocast:
            out = ddp(b)
            loss = out["loss_sum"] * d.world / n_tok
        scaler.scale(loss).backward()
        stats[0] += out["loss_sum"].detach().float()
        stats[1:] += modality_sums(out, b["modality"])
    if d.world > 1 and not is_ddp:
        average_gradients(params, d)
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    all_sum(stats, d)  # a non-finite loss on any rank makes the sum non-finite on every rank
    # the same on every rank without another collective: the summed loss and the all-reduced gradients agree
    finite = torch.isfinite(stats[0]) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        opt.found_inf = (~finite).float()  # read by fused AdamW: no update, no step count
        opt.step()
        del opt.found_inf
    return stats, n_tok, grad_norm, finite


class GraphedStep:
    """`train_step` recorded as one CUDA graph per batch shape and replayed (`train.cuda_graph`, one GPU per
    process; under torchrun the gradients' all-reduce is recorded with the step, see `data_parallel`).

    A replay is one launch for the whole step (forward, backward, clipping, AdamW), where the step otherwise
    costs the host thousands of kernel launches. The first step of a shape runs as it is (it compiles the
    layers and sets up the optimizer state), the second is recorded and replayed, and later ones copy their
    batch into the recorded inputs and replay. All graphs share one memory pool: their outputs are valid
    until the next step. Learning rates live on the device, so that the schedule reaches the graphs.

    A shape here is every tensor's shape. train.py collates with `static=True` for it, so that the labelled
    positions and the media of a batch come in few counts (`data.collate`); the row length takes the multiples
    of `data.pad_multiple`. At most `max_graphs` shapes are recorded; the others run as they are."""

    max_graphs = 16

    def __init__(self, step, opt):
        self.step, self.opt = step, opt
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[dict], tuple]] = {}
        self.seen: set[tuple] = set()
        self.told = False  # that the shapes outnumber max_graphs
        self.pool = None
        self.side = torch.cuda.Stream()
        for g in opt.param_groups:
            g["lr"], g["capturable"] = torch.tensor(float(g["lr"]), device=g["params"][0].device), True

    def __call__(self, micro: list[dict]):
        key = tuple((k, v.shape) for b in micro for k, v in b.items() if torch.is_tensor(v))
        if key in self.graphs:
            graph, inputs, outputs = self.graphs[key]
            for static, b in zip(inputs, micro):
                for k, v in static.items():
                    if torch.is_tensor(v):
                        v.copy_(b[k], non_blocking=True)
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
                outputs = self.step(micro)
            torch.cuda.current_stream().wait_stream(self.side)
            return outputs
        inputs = [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        self.opt.zero_grad(set_to_none=True)  # the graph's backward writes the gradients it allocates
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile, which is harmless
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.step(inputs)
        except Exception as e:
            raise RuntimeError(f"recording the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "train with train.cuda_graph = false") from e
        self.pool = graph.pool()
        self.graphs[key] = graph, inputs, outputs
        graph.replay()
        return outputs


def set_lr(opt, factor: float) -> None:
    """Each group's learning rate to `factor` times its peak (in place where it lives on the device)."""
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(g["peak"] * factor)
        else:
            g["lr"] = g["peak"] * factor


def make_step(ddp, opt, scaler, params: list[nn.Parameter], autocast, d: Dist, cfg: TrainConfig):
    """The training step that train() and bench.py run: `train_step`, or its CUDA graphs with train.cuda_graph."""
    def step(micro: list[dict]):
        return train_step(ddp, micro, opt, scaler, params, autocast, d, cfg.grad_clip)

    if not cfg.cuda_graph:
        return step
    if d.device.type != "cuda":
        raise ValueError("train.cuda_graph records the step on a GPU; on CPU set it to false")
    return GraphedStep(step, opt)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; at the end of each step all ranks agree (any rank's flag stops all)."""

    def __init__(self):
        self.flag = False
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.flag = True


def train(cfg: Config) -> dict:
    d = setup_distributed(cfg)
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if d.master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_dir)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        if cfg.data.make_demo:
            data.ensure_demo(cfg.data.make_demo)
    if d.world > 1:
        dist.barrier()
    log = print if d.master else (lambda *a, **k: None)

    tok, mm = build_model(cfg, d.device)
    log(M.parameter_report(parameter_groups(mm)))
    train_ds = make_dataset(cfg, cfg.data.train, tok, mm.aligner.config)
    val_ds = make_dataset(cfg, cfg.data.val, tok, mm.aligner.config) if cfg.data.val else None
    skipped = len(train_ds.skipped) + (len(val_ds.skipped) if val_ds else 0)
    if d.master and skipped:
        data.write_skipped(out_dir / "skipped.jsonl", train_ds.skipped + (val_ds.skipped if val_ds else []))
        log(f"skipped {skipped} bad samples; reasons in {out_dir / 'skipped.jsonl'}")

    opt, params = make_optimizer(mm, cfg.train, d.device)
    scaler, autocast = mixed_precision(cfg.train, d.device)

    step, consumed, best, bad_in_row, bad_total = 0, 0, float("inf"), 0, 0
    resume = find_resume(cfg)
    if resume is not None:
        state = load_checkpoint(resume, mm, opt, scaler, d)
        step, consumed, best, bad_total = state["step"], state["consumed"], state["best"], state["bad_steps"]
        log(f"resumed from {resume} at step {step} (global sample {consumed})")
    else:
        torch.manual_seed(cfg.train.seed + d.rank)  # dropout differs across ranks, the same on every run
    ddp = data_parallel(mm, d, cfg.train)
    run_step = make_step(ddp, opt, scaler, params, autocast, d, cfg.train)  # after a resume: graphs keep its state
    mm.train()
    stop = StopRequest()
    metrics = Metrics(out_dir, d.master)
    G = cfg.train.batch_size * cfg.train.grad_accum * d.world

    def save(name: str, collective: bool = True) -> None:
        """Checkpoint `name`; `collective=False` (after an exception) lets rank 0 save alone, without the other
        ranks' RNG states, since a collective could hang on a failed peer."""
        rngs = [rng_state()] + [None] * (d.world - 1)
        if d.world > 1 and collective:
            dist.all_gather_object(rngs, rng_state())
        if d.master:
            state = {"step": step, "consumed": consumed, "epoch": consumed // len(train_ds), "best": best,
                     "bad_steps": bad_total, "world_size": d.world, "lr_factor": lr_factor(step, cfg.train),
                     "llm_config": dataclasses.asdict(mm.llm.config), "config": dataclasses.asdict(cfg)}
            write_checkpoint(ckpt_dir, name, mm, opt, scaler, state, rngs)
            if name.startswith("step_"):
                for old in sorted(ckpt_dir.glob("step_*"))[:-cfg.train.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        if d.world > 1 and collective:
            dist.barrier()

    loader = iter(make_loader(train_ds, cfg, d, tok, consumed))
    t_last, tokens_since, last_row = time.perf_counter(), 0, {}
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        while step < cfg.train.max_steps:
            set_lr(opt, lr_factor(step, cfg.train))
            micro = [next(loader) for _ in range(cfg.train.grad_accum)]
            tokens_since += sum(int(b["lengths"].sum()) for b in micro) * d.world  # all tokens processed
            micro = [to_device(b, d.device) for b in micro]
            stats, n_tok, grad_norm, finite = run_step(micro)
            finite = bool(finite)
            consumed += G  # after the step: a crash inside it re-reads its samples on resume
            if finite:
                step += 1
                bad_in_row = 0
            else:
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                log(f"step {step}: non-finite loss or gradient norm; step skipped ({bad_in_row} in a row)")
            opt.zero_grad(set_to_none=True)
            if bad_in_row >= cfg.train.max_bad_steps:
                save("emergency")
                raise RuntimeError(f"{bad_in_row} non-finite steps in a row (max_bad_steps = "
                                   f"{cfg.train.max_bad_steps}): the loss or the gradients overflow. Emergency "
                                   f"checkpoint in {ckpt_dir / 'emergency'}; lower the learning rates, use amp = bf16 "
                                   "or fp32, or check the data")

            if finite and (step % cfg.run.log_every == 0 or step == cfg.train.max_steps):
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_last
                mem = torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else 0.0
                row = {"step": step, "epoch": consumed / len(train_ds), "split": "train",
                       "loss": (stats[0] / n_tok).item(), "lr": float(opt.param_groups[1]["lr"]),
                       "grad_norm": grad_norm.item(), "tokens": int(n_tok.item()),
                       "tokens_per_s": tokens_since / dt, "step_time": dt / cfg.run.log_every,
                       "peak_mem_gib": round(mem, 3), "bad_steps": bad_total, "skipped_samples": skipped,
                       **modality_losses(stats[1:])}
                metrics.log(row)
                eta = (cfg.train.max_steps - step) * row["step_time"]
                log(f"step {step:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
                    f" | ETA {eta / 60:.1f} min | mem {mem:.2f} GiB")
                last_row, t_last, tokens_since = row, time.perf_counter(), 0

            last = step == cfg.train.max_steps
            if finite and val_ds is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
                row = evaluate(mm, val_ds, cfg, d, tok, autocast)
                metrics.log({"step": step, "epoch": consumed / len(train_ds), "split": "val", **row})
                log(f"eval step {step} | val loss {row['loss']:.4f} | accuracy {row['accuracy']}")
                last_row = {**last_row, "val": row}
                if row["loss"] < best:
                    best = row["loss"]
                    save("best")
                t_last = time.perf_counter()
            if any_rank(stop.flag, d):
                save("emergency")
                log(f"stop requested: emergency checkpoint at step {step} in {ckpt_dir / 'emergency'}")
                return {"stopped": True, "step": step, **last_row}
            if finite and ((cfg.train.save_every and step % cfg.train.save_every == 0) or last):
                save(f"step_{step:07d}")
    except Exception as e:
        if step > 0 and not isinstance(e, CheckpointWriteError):  # weights and optimizer are whole between steps
            with contextlib.suppress(Exception):
                save("emergency", collective=False)
        raise
    if d.master:
        export(mm, out_dir / "export", cfg.model.llm)
        log(f"exported the adapter (peft format) and projectors to {out_dir / 'export'}")
    return {"stopped": False, "step": step, **last_row}


def export(mm: M.MultimodalLM, folder: Path, base_model: str) -> None:
    """`adapter/` in peft's format (PeftModel.from_pretrained loads it as is) and `projectors.safetensors`.
    A merged LLM folder: `lora.merge_lora(mm.llm)` then `model.save_llm(mm.llm, folder)`."""
    from safetensors.torch import save_file

    lora.save_adapter(mm.llm, folder / "adapter", base_model)
    save_file({k: v.detach().contiguous().cpu() for k, v in mm.projectors.state_dict().items()},
              str(folder / "projectors.safetensors"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Any config key can be overridden: --section.key=value")
    ap.add_argument("--config", help="TOML config (configs/*.toml)")
    ap.add_argument("--build_feature_cache", action="store_true",
                    help="compute the aligner's features of data.train and data.val into data.feature_cache, then exit")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    if args.build_feature_cache:
        build_cache(cfg)
        return
    result = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result.get("stopped"):
        sys.exit(1)


def build_cache(cfg: Config) -> None:
    if not cfg.data.feature_cache:
        sys.exit("config error: set data.feature_cache to the folder for the cache")
    if cfg.data.make_demo:
        data.ensure_demo(cfg.data.make_demo)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    tok = M.load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    aligner = M.load_aligner(cfg.model.aligner, device)
    for split in (cfg.data.train, cfg.data.val):
        if split:
            ds = make_dataset(cfg, split, tok, aligner.config, use_cache=False)
            folder = cache_folder(cfg, split)
            n = data.build_feature_cache(ds, aligner, folder, device, num_workers=cfg.data.num_workers)
            print(f"cached aligner features of {n} samples of {split} in {folder}")


if __name__ == "__main__":
    main()

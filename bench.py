"""Benchmark of mmlora's training step, beside the transformers + peft baseline, on the same GPU in the same run.

    python bench.py --grid main --peer .bench/hf_peft_baseline.py     # BENCHMARKS.md's table: ours (whole-step
                                                                      # graph) and the peer, same shapes
    python bench.py --grid layers                                     # ours there with per-layer graphs
    python bench.py --batch 8 --seq 2048 --ckpt --compile             # one workload of ours (per-layer graphs)
    python bench.py --seq 512 --compile --cuda_graph                  # the same, the whole step as one graph
    python bench.py --seq 512 --compile --cuda_graph --memory_trace   # ... and what is live at its memory peak
    python bench.py --grid dpo --peer .bench/hf_dpo_baseline.py       # a DPO step beside an SFT step, and TRL's
    python bench.py --grid dpo --tiny                                 # a smoke run: a tiny shape, on the CPU
    torchrun --nproc_per_node=2 bench.py --grid ddp --peer ...        # per-GPU figures under torchrun
    torchrun --nproc_per_node=2 bench.py --grid fsdp --peer ...       # 7B ddp vs fsdp (and the peer), 72B fsdp
    torchrun --nproc_per_node=2 bench.py --load_sharded HF_DIR       # each rank's peak host memory, sharded load
    python bench.py --grid predict [--old DIR]                        # generate.py --predict on 2,000 samples
    python bench.py --grid serve [--tiny]                             # serve.py under 1-128 streaming clients
    python bench.py --grid serve --tiny --clients 8,32,128            # its host side on a CPU (tiny model)
    python bench.py --make_assets /tmp/qwen-demo                      # the demo with a 0.5B LLM, for train.py
    python bench.py --make_assets /tmp/qwen-towers --towers           # ... and SigLIP / Whisper-shaped towers
    python bench.py --grid track --rounds 3                           # the main 8 x 512 step with a metrics row a
                                                                      # step, beside the same with all three trackers

The step is train.py's own (`train.make_step`, its optimizer and AMP setup, batches from `data.collate`) on
a model of Qwen2.5-0.5B's shape with random weights (frozen base in bf16, LoRA r=16 on q,k,v,o and projectors
in fp32) and synthetic batches where the second half of each row is labelled, as in the peer. MFU counts
4*N_frozen_body + 4*N_lm_head*labelled + 6*N_trainable + 6*layers*seq*heads*head_dim FLOPs per token over a peak
of 790 TFLOP/s (the bf16 matrix rate measured on an H200). Each row is printed as JSON when measured and all go
to `bench_*.json`; with `--peer`, a closing Markdown table gives ours beside each peer row and the ratios.

`--grid dpo` times train.py's DPO step (train.objective = "dpo": B pairs of a prompt of seq/2 tokens and two answers
of seq/2, as 2B rows, with the reference pass) beside its SFT step over the same B samples (prompt and chosen answer)
and over as many rows (2B), and TRL's DPO step with peft (`.bench/hf_dpo_baseline.py`); a closing table gives
the DPO step's time over the SFT step's on the same samples and its memory over the SFT step's on as many rows.

Generation, `--grid predict` and `--grid serve` (using a run rather than training it) are timed by bench_inference.py,
on the shapes defined here.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import demo
import build
import track
import train
from bench_inference import hf_server, sync, time_generation, time_prediction, time_serving
from checkpoint import TrainState
from config import TRACKERS, Config
from metrics import Metrics, flops_per_token, metric_fields, peak_memory_gib
from distributed import World, materialize_sharded, read_shards, setup_distributed
from weights import save_tensors, set_tensor, skeleton, write_json
from model import LLM, LLMConfig, llm_skeleton, rope_inv_freq
from encoders import Aligner, AlignerConfig, EncoderConfig, VisionTower, WhisperTower
from multimodal import MultimodalLM
from quant import NF4Linear, quantized_linears
from preference import PreferenceBatch, PreferenceItem, collate_preferences

PEAK_FLOPS = 790e12
QWEN25_05B = dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                  rope_theta=1e6, tie_word_embeddings=True, qkv_bias=True)
# Qwen2.5-7B's and Qwen2.5-72B's shapes, for train.strategy = "fsdp" (--shape 7b / 72b)
QWEN25_7B = dict(QWEN25_05B, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)
QWEN25_72B = dict(QWEN25_7B, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
SHAPES = {"0.5b": QWEN25_05B, "7b": QWEN25_7B, "72b": QWEN25_72B}
# an aligner of ~86M parameters: what the replaced system's 588.5M total holds beside the LLM and projectors
SEED_ALIGNER = AlignerConfig(dim=1024, image=EncoderConfig(768, 6, 12), audio=EncoderConfig(768, 6, 12),
                             image_size=224, patch_size=16, clip_seconds=5.0, n_mels=80)


# --tiny: a shape for smoke runs on the CPU
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY_ALIGNER = AlignerConfig(dim=32, image=EncoderConfig(32, 1, 2), audio=EncoderConfig(32, 1, 2), image_size=32,
                             patch_size=8)


def bench_model(args, device, shape: dict | None = None, aligner_config: AlignerConfig = SEED_ALIGNER,
          world: World | None = None) -> tuple[Config, MultimodalLM]:
    if getattr(args, "tiny", False):
        shape, aligner_config = TINY, TINY_ALIGNER
    shape = shape or SHAPES[getattr(args, "shape", "0.5b")]
    cfg = Config()
    cfg.train.objective = "dpo" if getattr(args, "dpo", False) else "sft"
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 16, 32.0, 0.05
    cfg.model.image_tokens, cfg.model.audio_tokens = 32, 32
    cfg.train.activation_checkpointing = args.ckpt
    cfg.train.activation_memory_budget = getattr(args, "memory_budget", 1.0)
    cfg.train.offload_activations = getattr(args, "offload", False)
    cfg.train.cuda_graph = args.cuda_graph
    cfg.model.loss_chunk = getattr(args, "loss_chunk", 0) or cfg.model.loss_chunk
    # compiled layers record graphs of their own (reduce-overhead) where the config allows it: not inside a recorded
    # step, nor in DPO's step, which runs each layer twice (config.check_config)
    own_graphs = not args.cuda_graph and cfg.train.objective == "sft"
    cfg.train.compile = (args.compile_mode or ("reduce-overhead" if own_graphs else "default")) \
        if args.compile else "none"
    if getattr(args, "towers", False):
        cfg.model.image_tokens, cfg.model.audio_tokens = 81, 50  # as configs/qwen2.5-0.5b-siglip-whisper.toml
        folder = "/tmp/mmlora-bench-towers"
        if not os.path.isdir(folder):
            write_random_towers(folder)
        aligner_config = AlignerConfig(dim=1024, image=EncoderConfig(hf=f"{folder}/siglip", layer=-2),
                                       audio=EncoderConfig(hf=f"{folder}/whisper"))
    sharded = getattr(args, "fsdp", False)
    if sharded:
        cfg.train.strategy = "fsdp"
    torch.manual_seed(0)
    if getattr(args, "qlora", False):
        cfg.model.quantize = "nf4"
        llm = random_nf4_llm(shape, device)
    else:
        with torch.device("meta" if sharded else device):  # sharded: each rank makes only its shards, below
            llm = LLM(LLMConfig(**shape)).init_weights().to(torch.bfloat16)
    aligner = Aligner(aligner_config).to(device).requires_grad_(False).eval()
    media_ids = {"image": shape["vocab_size"] - 2, "audio": shape["vocab_size"] - 1}
    model = build.assemble(cfg, llm, aligner, media_ids)
    if sharded:
        materialize_sharded(model, cfg.train, world, random_shards)
    return cfg, model


@torch.no_grad()
def random_nf4_llm(shape: dict, device) -> LLM:
    """A random LLM of `shape` with its decoder layers' linear weights in NF4 (as model.quantize = "nf4" loads
    them), made one weight at a time on `device`: a 72B-shaped base never exists in bf16."""
    with skeleton():
        llm = LLM(LLMConfig(**shape))
    for name in quantized_linears(llm):
        lin = llm.get_submodule(name)
        w = torch.empty(lin.out_features, lin.in_features, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02)
        bias = None if lin.bias is None else torch.zeros(lin.out_features, device=device, dtype=torch.bfloat16)
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, NF4Linear(w, bias, 64, True, torch.bfloat16, name))
        del w
    for name, p in list(llm.named_parameters()):
        if p.is_meta:
            t = torch.ones if "norm" in name else torch.zeros if name.endswith("bias") else None
            value = t(p.shape, device=device, dtype=torch.bfloat16) if t else \
                torch.empty(p.shape, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02)
            set_tensor(llm, name, value)
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    llm.inv_freq = rope_inv_freq(llm.config).to(device)
    return llm.requires_grad_(False)


@torch.no_grad()
def random_shards(llm: LLM) -> None:
    """Hugging Face's initialisation (as `LLM.init_weights`) of each rank's shards of a sharded base."""
    for n, p in llm.named_parameters():
        if ".lora_" not in n:
            local = p.to_local()
            local.fill_(1.0) if "norm" in n else local.zero_() if n.endswith("bias") else local.normal_(0.0, 0.02)


def media_shapes(model: MultimodalLM) -> dict[str, tuple[tuple, int]]:
    """Per modality, one medium's raw shape and the aligner's token count for it (our encoders or HF towers)."""
    c, out = model.aligner.config, {}
    image, audio = model.aligner.image.encoder, model.aligner.audio.encoder
    if c.image.hf:
        S, P = image.tower.image_size, image.tower.embeddings.patch_embedding.stride[0]
        out["image"] = ((3, S, S), (S // P) ** 2)
    else:
        out["image"] = ((3, c.image_size, c.image_size), c.num_patches)
    samples = int(c.sample_rate * c.clip_seconds)
    out["audio"] = ((samples,), audio.tower.embed_positions.num_embeddings if c.audio.hf else c.num_audio_tokens)
    return out


def make_batch(args, model: MultimodalLM, device, g: torch.Generator) -> data.Batch | PreferenceBatch:
    """B rows of `seq` tokens through `data.collate`, the second half of each document labelled; optionally media
    per row, 2 images and 1 clip (1 image with --towers), raw or as the feature cache stores them; or rows packed
    with documents of T/8 to T/2. With `dpo`, B preference pairs through `preference.collate_preferences`: each row
    above is a prompt (its first half) and the chosen answer, and the rejected answer is another second half."""
    B, T, V = args.batch, args.seq, model.llm.config.vocab_size - 16
    c = model.aligner.config
    K = {m: p.num_tokens for m, p in model.projectors.items()}
    images = 1 if getattr(args, "towers", False) else 2
    starts = {"image": [1 + i * (1 + K["image"]) for i in range(images)], "audio": [1 + images * (1 + K["image"])]}
    shapes = media_shapes(model)
    items = []
    for _ in range(B):
        left = T
        while left:  # the last document of a packed row takes the rest, so that every batch is (B, T)
            n = min(left, int(torch.randint(T // 8, T // 2, (1,), generator=g))) if args.pack else T
            ids = torch.randint(0, V, (n,), generator=g).tolist()
            labels = [-100] * (n // 2) + ids[n // 2 + 1:] + [-100]
            item = data.Item(str(len(items)), ids, labels)
            if args.multimodal:  # the media blocks in the prompt half
                counts = {"image": images, "audio": 1}
                for m, first in starts.items():
                    slots = [s + k for s in first for k in range(K[m])]
                    for t in slots:
                        ids[t] = model.media_token_ids[m]
                    slots = torch.tensor(slots)
                    raw_shape, n_tokens = shapes[m]
                    if args.cache:
                        item.media[m] = data.Media(slots, tokens=torch.randn(counts[m], n_tokens, c.dim),
                                                   pooled=torch.randn(counts[m], c.dim))
                    else:
                        item.media[m] = data.Media(slots, raw=torch.randn(counts[m], *raw_shape) * 0.1)
            items.append(item)
            left -= n
    if getattr(args, "dpo", False):
        def rejected(it: data.Item) -> data.Item:
            ids = it.input_ids[:T // 2] + torch.randint(0, V, (T - T // 2,), generator=g).tolist()
            return data.Item(it.id, ids, [-100] * (T // 2) + ids[T // 2 + 1:] + [-100], it.media)
        return collate_preferences([PreferenceItem(it.id, it, rejected(it)) for it in items], 0).to(device)
    return data.collate(items, 0, pack=args.pack, max_len=T).to(device)


def row_writer(args, cfg: Config, world: World, folder: Path):
    """With `args.trackers` (a comma-separated list, "" for none): what train.py does at a logged step, at every
    step (log_every = 1): the metrics row (`train.train_row`, its host reads) written by `metrics.Metrics` to the CSV
    and JSONL in `folder` and queued for the trackers named (W&B offline unless WANDB_MODE says otherwise).
    Returns (write(out, opt, elapsed, tokens), the trackers to close), or (None, None) without `args.trackers`."""
    if getattr(args, "trackers", None) is None:
        return None, None
    names = [n for n in args.trackers.split(",") if n]
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, log_every=1, trackers=names))
    trackers = track.Trackers(names, folder, "mmlora-bench")
    trackers.start(track.flatten(dataclasses.asdict(cfg)), {"bench": "1"}, 0)
    trackers.started.wait(300)  # the timed steps do not overlap the trackers' imports and starts
    metrics = Metrics(folder, world.master, metric_fields("instruct"), trackers)
    run = TrainState()

    def write(out, opt, elapsed: float, tokens: int) -> None:
        run.step += 1
        metrics.log(train.train_row(run, out, opt, elapsed, 1, tokens, 0.0, None, 0, 1, world, cfg))
    return write, trackers


def allocated(device: torch.device) -> int:
    """The GPU memory allocated now (0 on a CPU: its figures are the process's peak resident memory)."""
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def time_ours(args, world: World) -> dict:
    cuda = world.device.type == "cuda"
    before = allocated(world.device)  # what earlier workloads still hold does not count as this one's
    cfg, model = bench_model(args, world.device, world=world)
    write_row, trackers = row_writer(args, cfg, world, Path(tempfile.mkdtemp(prefix="mmlora-bench-rows-")))
    opt, params = train.make_optimizer(model, cfg.train)
    scaler, autocast = train.mixed_precision(cfg.train, world.device)
    train.store_for_autocast(model.aligner, autocast)
    run_step = train.make_step(model, opt, scaler, params, autocast, world, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(args, model, world.device, g) for _ in range(3)]
    if args.cuda_graph:  # padded once here, so that GraphedStep finds nothing left to pad in the timed steps
        batches = [b.pad_static(cfg.data.pad_multiple) for b in batches]
    model.train()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # before the warm-up: CUDA graphs allocate their memory when recorded
    held = allocated(world.device) - before  # this workload's weights, optimizer state and batches
    trace = getattr(args, "memory_trace", False)
    if trace:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        out = run_step([batches[i % 3]])
        opt.zero_grad(set_to_none=True)
        sync()
        if write_row is not None:  # the row's host reads follow the synchronize, as in train.py
            write_row(out, opt, time.perf_counter() - t0, sum(batches[i % 3].lengths) * world.size)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if trackers is not None:
        trackers.close([], "finished")
    if trace:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        if world.master:
            print(peak_report(snapshot, torch.cuda.current_device(), held), flush=True)
    if args.profile:  # every rank steps (their collectives pair up); rank 0 prints
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                run_step([batches[i]])
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "self_cpu_time_total") if world.master else ():  # the GPU's time, the host's
            print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    med = sorted(times)[len(times) // 2]
    b = batches[0]
    tokens = sum(b.lengths)
    labelled = float((getattr(b, "rows", b).labels != -100).sum()) / tokens
    fpt = flops_per_token(model, args.seq, labelled, reference=args.dpo)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else peak_memory_gib(world.device)
    return {"impl": "mmlora", "batch": args.batch, "seq": args.seq, "grad_ckpt": args.ckpt, "compile": args.compile,
            "objective": "dpo" if args.dpo else "sft", "rows": len(b.lengths),
            "cuda_graph": args.cuda_graph, "shape": args.shape, "strategy": "fsdp" if args.fsdp else "ddp",
            "memory_budget": args.memory_budget, "loss_chunk": cfg.model.loss_chunk, "qlora": args.qlora,
            "offload": args.offload, "trackers": getattr(args, "trackers", None),
            "pack": args.pack, "multimodal": args.multimodal and ("cache" if args.cache else "raw"),
            "towers": getattr(args, "towers", False),
            "ms_per_step": round(med * 1e3, 2), "tokens_per_s": round(tokens / med),
            "mfu": round(fpt * tokens / med / PEAK_FLOPS, 3),
            "peak_mem_gib": round(peak, 2),
            "loss": round((out.stats[0] / out.n_tokens).item(), 4)}


OUR_FILES = tuple(sorted(p.name for p in Path(__file__).resolve().parent.glob("*.py")))  # the project's files


def peak_at(snapshot: dict, device: int) -> tuple[int, dict[str, list[int]]]:
    """Replay a memory snapshot's trace (`torch.cuda.memory._snapshot()` after `_record_memory_history`) to its
    highest point: the bytes allocated there above what was allocated before the recording began, and the blocks
    live there (their sizes), grouped by the innermost frame in this project's files that allocated them."""
    def where(frames: list[dict]) -> str:
        ours = [f for f in frames if f["filename"].rsplit("/", 1)[-1] in OUR_FILES and "site-packages" not in
                f["filename"]]
        f = ours[0] if ours else frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
        return f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"

    live, now, peak, at_peak = {}, 0, 0, {}
    for ev in snapshot["device_traces"][device]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], where(ev.get("frames", [])))
            now += ev["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            now -= live.pop(ev["addr"])[0]
    groups: dict[str, list[int]] = {}
    for size, key in at_peak.values():
        groups.setdefault(key, []).append(size)
    return peak, groups


def peak_report(snapshot: dict, device: int, held: int, top: int = 12) -> str:
    """`peak_at` as lines: the peak's traced bytes above the `held` bytes of the workload before its first step,
    then the largest groups of blocks live there (MiB, count, where)."""
    peak, groups = peak_at(snapshot, device)
    lines = [f"memory trace: {peak / 2**30:.2f} GiB allocated at the peak, above the {held / 2**30:.2f} GiB held "
             "before the first step (weights, optimizer state, batches)"]
    for key, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(sizes) / 2**20:9.1f} MiB {len(sizes):5d} blocks  {key}")
    return "\n".join(lines)


def load_sharded(folder: str) -> None:
    """Load an LLM folder as train.strategy = "fsdp" does (meta-device build, LoRA, sharding, each rank reading its
    rows) on this process's rank, and print the rank's peak host memory (RSS) beside the bytes of its shards."""
    import resource

    cfg = Config()
    cfg.train.strategy, cfg.lora.dropout, cfg.run.device = "fsdp", 0.0, "cpu"
    world = setup_distributed(cfg)
    t0 = time.perf_counter()
    llm, files = llm_skeleton(folder)
    llm.to(torch.bfloat16)
    small = AlignerConfig(dim=64, image=EncoderConfig(64, 1, 2), audio=EncoderConfig(64, 1, 2))
    vocab = llm.config.vocab_size
    model = build.assemble(cfg, llm, Aligner(small), {"image": vocab - 2, "audio": vocab - 1})
    materialize_sharded(model, cfg.train, world, lambda sharded: read_shards(sharded, files))
    held = sum(p.to_local().numel() * p.element_size() for p in model.llm.parameters()) / 2**30
    whole = sum(p.numel() * p.element_size() for p in model.llm.parameters()) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"rank {world.rank}: peak host memory {peak:.2f} GiB while loading; its shards {held:.2f} GiB of "
          f"{whole:.2f} GiB; {time.perf_counter() - t0:.0f} s", flush=True)
    dist.destroy_process_group()


def time_peer(path: str, batch: int, seq: int, ckpt: bool, compile_: bool, shape: str = "0.5b", liger: bool = False,
              qlora: bool = False) -> dict:
    """The peer's step on the same shapes (`qlora`: its base in bitsandbytes' NF4); another model shape than 0.5B
    needs a copy of the peer whose `run` takes `shape` (a Qwen2Config's keys)."""
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    extra = {"qlora": True} if qlora else {}
    if shape != "0.5b":
        extra["shape"] = {k: v for k, v in SHAPES[shape].items() if k not in ("architecture", "qkv_bias")}
    before = torch.cuda.memory_allocated()  # held by earlier workloads of ours, not the peer's
    row = peer.run(torch.bfloat16, batch, seq, ckpt, compile_, liger=liger, **extra)
    if "peak_mem_gib" in row:
        row["peak_mem_gib"] = round(row["peak_mem_gib"] - before / 2**30, 2)
    return {"impl": "transformers+peft", "shape": shape, **row}


# SigLIP-so400m-patch14-384's vision tower and Whisper-small's encoder: the shapes of
# configs/qwen2.5-0.5b-siglip-whisper.toml
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6)
WHISPER_SMALL = dict(model_type="whisper", d_model=768, encoder_layers=12, encoder_attention_heads=12,
                     encoder_ffn_dim=3072, num_mel_bins=80, max_source_positions=1500, activation_function="gelu")


def write_random_towers(folder: str, vision: dict = SIGLIP_SO400M, audio: dict = WHISPER_SMALL) -> tuple[str, str]:
    """Hugging Face folders of a SigLIP-so400m-shaped vision tower and a Whisper-small-shaped encoder with random
    bf16 weights (the keys as SiglipVisionModel and WhisperModel write them) and their preprocessing configs."""
    out = []
    for name, cfg, tower_class, prefix, pre in (
            ("siglip", vision, lambda c: VisionTower(c, "siglip"), "vision_model.",
             {"do_resize": True, "size": {"height": vision["image_size"], "width": vision["image_size"]},
              "resample": 3, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
            ("whisper", audio, WhisperTower, "encoder.",
             {"feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400})):
        path = os.path.join(folder, name)
        os.makedirs(path, exist_ok=True)
        torch.manual_seed(0)
        tower = tower_class(cfg).to(torch.bfloat16)
        save_tensors({prefix + k: v for k, v in tower.state_dict().items()}, os.path.join(path, "model.safetensors"))
        write_json(Path(path) / "config.json", cfg)
        write_json(Path(path) / "preprocessor_config.json", pre)
        out.append(path)
    return out[0], out[1]



def workload(seq: int, **flags) -> dict:
    """One of ours: batch 8 of `seq` tokens, compiled layers, plus the flags given (ckpt, pack, cuda_graph...)."""
    return {"batch": 8, "seq": seq, "ckpt": False, "compile": True, "pack": False, "multimodal": False, "cache": False,
            "cuda_graph": False, "towers": False, "shape": "0.5b", "fsdp": False, "qlora": False, "memory_budget": 1.0,
            "compile_mode": "", "loss_chunk": 0, "offload": False, "trackers": None, "dpo": False, **flags}


ALL_TRACKERS = ",".join(TRACKERS)
# workloads of ours, each with the peer's (ckpt, compile) rows to compare it with
GRIDS = {
    # QLoRA: the 7B shape in NF4 beside bf16 (eager, checkpointed, 8 x 2048), and the same with the checkpointed
    # inputs in host memory (train.offload_activations); qlora72: the 72B shape in NF4 on one GPU
    "qlora": [(workload(2048, ckpt=True, compile=False, shape="7b", qlora=True), []),
              (workload(2048, ckpt=True, compile=False, shape="7b", qlora=True, offload=True), []),
              (workload(2048, ckpt=True, compile=False, shape="7b"), [])],
    "qlora72": [(workload(2048, ckpt=True, compile=False, shape="72b", qlora=True), []),
                (workload(2048, ckpt=True, compile=False, shape="72b", qlora=True, offload=True), [])],
    # the 0.5B shape in NF4 beside transformers + peft + bitsandbytes' NF4 (the peer's --qlora rows): the plain
    # step, then the whole step recorded (as the main grid's rows)
    "qlora_peer": [(workload(512, compile=False, qlora=True), [(False, False)]),
                   (workload(2048, compile=False, qlora=True), [(False, False)]),
                   (workload(2048, ckpt=True, compile=False, qlora=True), [(True, False)]),
                   (workload(512, cuda_graph=True, qlora=True), [(False, False)]),
                   (workload(2048, cuda_graph=True, qlora=True), [(False, False)]),
                   (workload(2048, ckpt=True, cuda_graph=True, qlora=True), [(True, False)])],
    "main": [(workload(512, cuda_graph=True), [(False, False), (False, True), (False, False, True)]),
             (workload(2048, cuda_graph=True), [(False, False), (False, True), (False, False, True)]),
             (workload(2048, ckpt=True, cuda_graph=True), [(True, False), (True, True)]),
             # packed rows (documents of 256 to 1024 tokens): the layers compiled, no whole-step graph
             (workload(2048, pack=True, compile_mode="default"), []),
             # the plain step, as people first run and read it, beside the peer eager of the first row
             (workload(512, compile=False), [])],
    # activation memory: the loss's chunks of labelled rows (one chunk's logits and their gradient are the step's
    # largest temporary) beside Liger's kernels (needs the liger wheel); train.activation_memory_budget's rows are
    # in BENCHMARKS.md
    "memory": [(workload(512, cuda_graph=True, loss_chunk=4096), [(False, False, True)]),
               (workload(512, cuda_graph=True, loss_chunk=1024), []),
               (workload(512, cuda_graph=True, loss_chunk=512), []),
               (workload(512, cuda_graph=True, loss_chunk=256), []),
               (workload(2048, cuda_graph=True, loss_chunk=4096), [(False, False, True)]),
               (workload(2048, cuda_graph=True, loss_chunk=1024), []),
               (workload(2048, cuda_graph=True, loss_chunk=512), []),
               (workload(2048, cuda_graph=True, loss_chunk=256), [])],
    "layers": [(workload(512), []), (workload(2048), []), (workload(2048, ckpt=True), [])],
    "extra": [(workload(512, compile=False), []), (workload(512, multimodal=True, cuda_graph=True), []),
              (workload(512, multimodal=True, cache=True, cuda_graph=True), []),
              (workload(512, cuda_graph=True), []), (workload(2048, pack=True, compile_mode="default"), [])],
    # packed rows beside unpacked ones at equal tokens (whole-step graph, and layers compiled as packed rows run),
    # and the plain step beside the peer eager
    "pack": [(workload(2048, cuda_graph=True), []), (workload(2048, compile_mode="default"), []),
             (workload(2048, pack=True, compile_mode="default"), []),
             (workload(512, compile=False), [(False, False)])],
    # the plain step (train.compile = "none") beside the peer eager, each right after the other: both are bound by
    # the host, whose speed moves with the machine and the process's history
    "plain": [(workload(512, compile=False), [(False, False)]), (workload(2048, compile=False), [(False, False)])],
    "ddp": [(workload(512, cuda_graph=True), [(False, False)]), (workload(2048, cuda_graph=True), [(False, True)])],
    # under torchrun (2 GPUs): 7B-shaped base, ddp beside fsdp, and the peer under DDP; fsdp72: a 72B-shaped base
    # (145 GB of bf16 weights, more than one GPU holds) with fsdp
    # (layers compiled with Inductor's default mode: FSDP's gathered weights move from step to step, which per-layer
    # CUDA graphs would record again at every step)
    "fsdp": [(workload(2048, ckpt=True, shape="7b", compile_mode="default", steps=8, warmup=3), [(True, False)]),
             (workload(2048, ckpt=True, shape="7b", fsdp=True, compile_mode="default", steps=8, warmup=3), [])],
    "fsdp72": [(workload(2048, ckpt=True, shape="72b", fsdp=True, compile_mode="default", steps=3, warmup=2), [])],
    # the tracker's cost: the main grid's first row, and the plain step (bound by the host, where a tracker's thread
    # could slow the step down), each with a metrics row a step, without and with all three trackers
    "track": [(workload(512, cuda_graph=True, trackers=t, steps=100, warmup=10), []) for t in ("", ALL_TRACKERS)]
    + [(workload(512, compile=False, trackers=t, steps=100, warmup=10), []) for t in ("", ALL_TRACKERS)],
    # DPO (train.objective = "dpo"): 8 pairs as 16 rows with the reference pass, beside the SFT step on the same 8
    # samples (prompt and chosen answer) and on 16 rows, eager and as the main grid runs (compiled layers, the whole
    # step recorded), and TRL's DPO step with peft (hf_dpo_baseline.py), eager and compiled
    "dpo": [row for seq in (512, 2048) for row in (
        (workload(seq, compile=False, dpo=True), [(False, False)]), (workload(seq, compile=False), []),
        (workload(seq, compile=False, batch=16), []),
        (workload(seq, dpo=True, cuda_graph=True), [(False, True)]), (workload(seq, cuda_graph=True), []),
        (workload(seq, batch=16, cuda_graph=True), []))],
    "towers": [(workload(1024, cuda_graph=True, towers=True), []),
               (workload(1024, multimodal=True, cuda_graph=True, towers=True), []),
               (workload(1024, multimodal=True, cache=True, cuda_graph=True, towers=True), [])],
}


def describe(r: dict) -> str:
    """One benchmark row as a table cell: time, tokens/s, MFU (ours), memory; or its error."""
    if "error" in r:
        return f"error: {r['error'][:80]}"
    mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    return f"{r['ms_per_step']:.1f} ms, {r['tokens_per_s'] / 1e3:.1f}k tok/s{mfu}, {r['peak_mem_gib']:.2f} GiB"


def ratio_table(pairs: list[tuple[dict, dict]]) -> str:
    """Markdown table of ours beside each peer row of the same shapes, with the ratios of tokens/s and memory."""
    lines = ["| workload | mmlora | peer | tokens/s vs peer | memory vs peer |", "|---|---|---|---|---|"]
    for ours, peer in pairs:
        ckpt = ours.get("grad_ckpt", ours.get("ckpt"))  # (a row that failed holds its workload's flags)
        shape = f"{ours['batch']} x {ours['seq']}" + (", activation checkpointing" if ckpt else "") \
            + (", whole-step graph" if ours.get("cuda_graph") else "") + (", NF4" if ours.get("qlora") else "") \
            + (", DPO pairs" if ours.get("objective") == "dpo" else "")
        which = "peer " + ("compiled" if peer["compile"] else "eager") + (" + Liger" if peer.get("liger") else "") \
            + (" + bitsandbytes NF4" if peer.get("qlora") else "")
        ratios = ["-", "-"]
        if "error" not in ours and "error" not in peer:
            ratios = [f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x",
                      f"{ours['peak_mem_gib'] / peer['peak_mem_gib']:.2f}x"]
        lines.append(f"| {shape} | {describe(ours)} | {which}: {describe(peer)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def time_dpo_peer(path: str, pairs: int, seq: int, compile_: bool) -> dict:
    """TRL's DPO step with peft (`hf_dpo_baseline.py`: Qwen2.5-0.5B's shape) on `pairs` pairs of rows of `seq`."""
    spec = importlib.util.spec_from_file_location("hf_dpo_baseline", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    before = torch.cuda.memory_allocated()  # held by earlier workloads of ours, not the peer's
    row = peer.run(pairs, seq, compile_)
    if "peak_mem_gib" in row:
        row["peak_mem_gib"] = round(row["peak_mem_gib"] - before / 2**30, 2)
    return {"grad_ckpt": False, **row}


def dpo_table(rows: list[dict]) -> str:
    """Markdown table of each DPO row beside the SFT rows of its shapes: the time over the SFT step's on the same
    samples, the memory over the SFT step's on as many rows."""
    lines = ["| workload | DPO step | SFT, same samples | SFT, same rows | time vs SFT same samples | memory vs SFT "
             "same rows |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("impl") != "mmlora" or r.get("objective") != "dpo":
            continue
        same = {k: next((x for x in rows if x.get("impl") == "mmlora" and x.get("objective") == "sft"
                         and x.get("seq") == r["seq"] and x.get("compile") == r["compile"]
                         and x.get("cuda_graph") == r["cuda_graph"] and x.get("batch") == b),
                        {"error": "not run"}) for k, b in (("samples", r["batch"]), ("rows", 2 * r["batch"]))}
        ratios = ["-", "-"]
        if not any("error" in x for x in (r, same["samples"], same["rows"])):
            ratios = [f"{r['ms_per_step'] / same['samples']['ms_per_step']:.2f}x",
                      f"{r['peak_mem_gib'] / same['rows']['peak_mem_gib']:.2f}x"]
        shape = f"{r['batch']} pairs x {r['seq']}" + (", whole-step graph" if r["cuda_graph"] else
                                                      ", compiled layers" if r["compile"] else ", eager")
        lines.append(f"| {shape} | {describe(r)} | {describe(same['samples'])} | {describe(same['rows'])} | "
                     f"{' | '.join(ratios)} |")
    return "\n".join(lines)


def peer_row(args, ckpt: bool, compile_: bool, liger: bool, world: World) -> dict:
    """One peer row on the workload's shapes (a QLoRA workload's peer has its base in bitsandbytes' NF4; a DPO
    workload's is TRL's DPO step), printed; an error is reported as the row, as the peer's script does."""
    try:
        r = time_dpo_peer(args.peer, args.batch, args.seq, compile_) if args.dpo else \
            time_peer(args.peer, args.batch, args.seq, ckpt, compile_, args.shape, liger, args.qlora)
    except Exception as e:
        r = {"impl": "trl-dpo+peft" if args.dpo else "transformers+peft", "grad_ckpt": ckpt, "compile": compile_,
             "liger": liger, "error": repr(e)[:300]}
    torch.cuda.empty_cache()
    if world.master:
        print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=[*GRIDS, "predict", "serve"], help="a set of workloads (else the one given by "
                    "the flags); predict: generate.py --predict on 2,000 demo samples (time_prediction); serve: "
                    "serve.py under concurrent clients (time_serving)")
    ap.add_argument("--clients", type=lambda v: tuple(int(x) for x in v.split(",")),
                    help="--grid serve: the rows' concurrent clients (default 1,8,32,128; with --tiny 1,2,4), e.g. "
                    "8,32,128 --tiny for the server's host side on a CPU")
    ap.add_argument("--tiny", action="store_true", help="a smoke run of a grid's code on the CPU (its figures mean "
                    "nothing): with --grid serve the demo's tiny model and a few requests; else a tiny shape, seq / 8, "
                    "no compiled rows and at most 3 timed steps")
    ap.add_argument("--hf_server", metavar="EXPORT", help="run --grid serve's transformers-based server on EXPORT")
    ap.add_argument("--port", type=int, default=8771, help="with --hf_server")
    ap.add_argument("--device", default="cuda", help="with --hf_server")
    ap.add_argument("--old", help="with --grid predict: a checkout of an earlier commit, whose generate.py is timed "
                    "too")
    ap.add_argument("--make_assets", metavar="DIR", help="write the demo data with a random Qwen2.5-0.5B-shaped LLM "
                    "and a seed-sized aligner to DIR (for train.py runs on GPU), then exit")
    ap.add_argument("--towers", action="store_true", help="the aligner on SigLIP-so400m- and Whisper-small-shaped "
                    "towers (random weights; with --make_assets, for configs/qwen2.5-0.5b-siglip-whisper.toml)")
    ap.add_argument("--peer", help="path of hf_peft_baseline.py, to run the peer on the same shapes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--pack", action="store_true", help="packed documents with a document mask (B rows of seq tokens)")
    ap.add_argument("--multimodal", action="store_true", help="2 images + 1 audio clip per row (seed-sized aligner)")
    ap.add_argument("--cache", action="store_true", help="with --multimodal: features from the cache, no encoders")
    ap.add_argument("--compile_mode", default="", help="with --compile: the mode (default reduce-overhead, or "
                    "default with --cuda_graph or --dpo)")
    ap.add_argument("--cuda_graph", action="store_true", help="the whole step as one CUDA graph (train.cuda_graph)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of three steps")
    ap.add_argument("--memory_trace", action="store_true", help="record the allocator's history over the steps and "
                    "print what is live at the peak, by where in our code it was allocated")
    ap.add_argument("--generate", action="store_true", help="time generation instead (batch 1 and 32, prompt 256, "
                    "128 new tokens): ours, ours --compile and, with --peer, transformers' generate")
    ap.add_argument("--shape", choices=list(SHAPES), default="0.5b", help="the LLM's shape (Qwen2.5's)")
    ap.add_argument("--fsdp", action="store_true", help="train.strategy = fsdp (under torchrun)")
    ap.add_argument("--qlora", action="store_true", help="the decoder layers' weights in NF4 (model.quantize = nf4)")
    ap.add_argument("--dpo", action="store_true", help="the DPO step on B preference pairs (train.objective = dpo)")
    ap.add_argument("--load_sharded", metavar="HF_DIR", help="under torchrun (CPU gloo, or GPUs): load the LLM folder "
                    "sharded as train.strategy = fsdp does, print each rank's peak host memory, then exit")
    ap.add_argument("--offload", action="store_true", help="with --ckpt: the checkpointed layers' inputs in host "
                    "memory (train.offload_activations)")
    ap.add_argument("--memory_budget", type=float, default=1.0, help="train.activation_memory_budget (with --compile)")
    ap.add_argument("--loss_chunk", type=int, default=0, help="model.loss_chunk (default: the config's)")
    ap.add_argument("--rounds", type=int, default=1, help="run the workloads (and their peer rows) this many times "
                    "over, one after the other in this process")
    ap.add_argument("--trackers", default=None, help="write a metrics row every step as train.py does, to the CSV and "
                    "these trackers (comma-separated, \"\" for the CSV only), to time their cost")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the bench_*.json files")
    args = ap.parse_args()
    if args.pack and args.multimodal:
        ap.error("--pack and --multimodal are separate workloads")
    if args.load_sharded:
        load_sharded(args.load_sharded)
        return
    if args.make_assets:
        aligner_config, config = SEED_ALIGNER, "configs/qwen2.5-0.5b.toml"
        if args.towers:
            siglip, whisper = write_random_towers(args.make_assets)
            aligner_config = AlignerConfig(dim=1024, image=EncoderConfig(hf=siglip, layer=-2),
                                           audio=EncoderConfig(hf=whisper))
            config = "configs/qwen2.5-0.5b-siglip-whisper.toml"
        demo.make_demo(args.make_assets, pretrain_steps=0, llm_config=LLMConfig(**QWEN25_05B),
                       aligner_config=aligner_config, log=print)
        print(f"python train.py --config {config} --model.llm={args.make_assets}/llm "
              f"--model.aligner={args.make_assets}/aligner-init --model.chat_format=chatml "
              f"--data.train_file={args.make_assets}/data/train.jsonl "
              f"--data.val_file={args.make_assets}/data/val.jsonl")
        return
    if args.hf_server:
        hf_server(args.hf_server, args.port, args.device)
        return
    if args.grid == "serve":
        rows = time_serving(args, QWEN25_05B, SEED_ALIGNER)
        with open(os.path.join(args.out, "bench_serve.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.grid == "predict":
        rows = time_prediction(args, QWEN25_05B, SEED_ALIGNER)
        with open(os.path.join(args.out, "bench_predict.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.generate:
        rows = [r for b in (1, 32) for r in time_generation(QWEN25_05B, b, 256, 128, bool(args.peer), args.profile)]
        for b in (1, 32):
            by = {r["impl"]: r["tokens_per_s"] for r in rows if r["batch"] == b}
            if "transformers generate" in by:
                print(f"batch {b}: --compile {by['mmlora --compile'] / by['transformers generate']:.2f}x, plain "
                      f"{by['mmlora'] / by['transformers generate']:.2f}x transformers' generate", flush=True)
        with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    world = World(device=torch.device("cpu" if args.tiny else "cuda"))
    if "WORLD_SIZE" in os.environ:
        world = setup_distributed(Config())
    if world.master:
        device = "CPU" if args.tiny else torch.cuda.get_device_name()
        print(f"torch {torch.__version__}, {device}, world {world.size}", flush=True)
    work = GRIDS[args.grid] if args.grid else [({k: getattr(args, k) for k in workload(0)}, [])]
    if args.tiny:
        work = [({**f, "seq": f["seq"] // 8}, p) for f, p in work if not f["compile"] and not f["cuda_graph"]]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    work = work * args.rounds  # host-bound rows move from one model to the next: several rounds show the spread
    rows, pairs, liger_rows = [], [], []
    for flags, peers in work:
        vars(args).update(flags)
        try:
            ours = time_ours(args, world)
        except Exception as e:  # report and go on to the next workload
            ours = {"impl": "mmlora", **flags, "error": repr(e)[:500]}
        torch.compiler.reset()  # the next workload compiles afresh, as its own train.py run would
        gc.collect()  # the last workload's model, held in reference cycles, is freed before the next is measured
        torch.cuda.empty_cache()
        if world.master:
            print(json.dumps(ours), flush=True)
        rows.append(ours)
        for ckpt, compile_, *liger in peers if args.peer else []:  # (ckpt, compile[, liger])
            if liger and liger[0]:  # Liger patches transformers' model classes for the whole process: its rows
                liger_rows.append((ours, dict(vars(args)), ckpt, compile_))  # run after every plain peer row
                continue
            rows.append(peer_row(args, ckpt, compile_, False, world))
            pairs.append((ours, rows[-1]))
    for ours, flags, ckpt, compile_ in liger_rows:
        vars(args).update(flags)
        rows.append(peer_row(args, ckpt, compile_, True, world))
        pairs.append((ours, rows[-1]))
    order = {id(r): i for i, r in enumerate(rows)}
    pairs.sort(key=lambda pair: order[id(pair[0])])  # each workload's peer rows together again
    if world.master and pairs:
        print(ratio_table(pairs), flush=True)
    if world.master and args.grid == "dpo":
        print(dpo_table(rows), flush=True)
    if world.master:
        name = f"bench_{args.grid or 'one'}" + (f"_ws{world.size}" if world.size > 1 else "") + ".json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(rows, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

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
folder: lock, checkpoints, restore, export), step_graph.py (the whole step as CUDA graphs, train.cuda_graph,
an opt-in wrapper around `train_step`) and track.py (MLflow, TensorBoard and W&B fed with the metrics rows, alerts
on a sick run, the heartbeat file).
Every optimizer step consumes `batch_size * grad_accum * world_size` samples of one global stream (epoch-seeded
permutations, concatenated), so the data position is one number and a resume on any number of ranks continues
from the same global sample. The loss of a step is summed over tokens (Phase 1: pairs) and divided by the labelled
tokens (pairs) of the whole step on all ranks, so 1 rank and N ranks with the same global batch compute the same
gradient.
"""
from __future__ import annotations

import argparse
import collections
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

import align
import data
import dpo
import track
from weights import weights_hash, write_json
from model import llm_skeleton, until_stop
from tokenizer import Tokenizer, load_tokenizer
from encoders import Aligner, load_aligner
from multimodal import LossOutput, MultimodalLM, parameter_report
from media import load_audio, load_image
from quant import NF4Linear
from step_graph import GraphedStep
from decode import choose_decoder
from config import Config, TrainConfig, load_config
from distributed import (GatherRows, World, all_sum, any_rank, average_gradients, data_parallel,
    gradient_sync, is_sharded, setup_distributed, whole)
from checkpoint import (CheckpointReadError, CheckpointWriteError, RunFolderError, RunLock, TrainState,
    check_fresh_start, export, load_checkpoint, optimizer_state, read_start, remove_leftovers, resume_candidates,
    rng_state, trainable_state, write_checkpoint, write_folder)
from quant import check_blocks
from build import build_model, parameter_groups


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
                    epoch_size: int, collective: bool = True, alerts: track.Alerts | None = None,
                    start_hash: str | None = None) -> None:
    """Checkpoint `name` of the run (rank 0 writes; every rank's RNG state goes in), then drop old periodic ones.
    `collective=False` (after an exception) lets rank 0 save alone, without the other ranks' RNG states, since a
    collective could hang on a failed peer. A checkpoint that cannot be written is an alert too. `start_hash`:
    train.init_from's (`Start.hash`), which a resume checks."""
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
        try:
            write_checkpoint(ckpt_dir, name, tensors, optimizer, scaler, state, rngs)
        except CheckpointWriteError as e:
            if alerts is not None:
                alerts.fire("checkpoint_failed", str(e), run.step)
            raise
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
            f"{unit}_per_s", "step_time", "mfu", "data_wait", "peak_mem_gib", *EXTRA[kind], "bad_steps",
            "skipped_samples"]


class Metrics:
    """metrics.csv and metrics.jsonl, each row flushed as written; every row also goes to the run's trackers (with
    an evaluation's `samples`, its answers) and alerts, where given (track.py)."""

    def __init__(self, out_dir: Path, enabled: bool, fields: list[str], trackers: track.Trackers | None = None,
                 alerts: track.Alerts | None = None):
        self.enabled, self.fields, self.trackers, self.alerts = enabled, fields, trackers, alerts
        if enabled:
            new = not (out_dir / "metrics.csv").exists()
            self.csv_file = open(out_dir / "metrics.csv", "a", newline="")
            self.csv = csv.DictWriter(self.csv_file, fields)
            if new:
                self.csv.writeheader()
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def log(self, row: dict, samples: list[dict] | None = None) -> None:
        if self.enabled:
            self.csv.writerow({k: row.get(k, "") for k in self.fields})
            self.jsonl.write(json.dumps(row) + "\n")
            self.csv_file.flush()
            self.jsonl.flush()
            if self.trackers is not None:
                self.trackers.log(row, samples)
            if self.alerts is not None:
                self.alerts.check(row)


def trim_metrics(out_dir: Path, step: int, log) -> None:
    """Drop the rows past `step` from metrics.jsonl and metrics.csv, so that each step appears once: a run resumed
    at `step` logs the steps after it again, which the attempt that stopped may have logged already (and a line cut
    short by a kill goes too). Each file is rewritten under a temporary name and renamed into place."""
    dropped = 0
    for path in (out_dir / "metrics.jsonl", out_dir / "metrics.csv"):
        if not path.is_file():
            continue
        lines = path.read_bytes().splitlines(keepends=True)
        head = lines[:1] if path.suffix == ".csv" else []
        kept = [x for x in lines[len(head):] if x.endswith(b"\n") and logged_step(x, path.suffix) <= step]
        if len(head) + len(kept) < len(lines):
            dropped = max(dropped, len(lines) - len(head) - len(kept))
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(b"".join(head + kept))
            os.replace(tmp, path)
    if dropped:
        log(f"dropped {dropped} metric rows past step {step} from metrics.jsonl and metrics.csv (the stopped attempt "
            "logged them after the checkpoint this run resumed from)")


def logged_step(line: bytes, suffix: str) -> float:
    """The step of a row of metrics.jsonl or metrics.csv (whose first column is the step); inf for a line that is
    not a whole row."""
    try:
        return int(json.loads(line)["step"] if suffix == ".jsonl" else line.split(b",", 1)[0])
    except (ValueError, KeyError, TypeError):
        return math.inf


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


# dense bf16 peaks in TFLOP/s as their makers state them, by a part of the GPU's name (the first that matches)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0,
               "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    """One device's peak FLOP/s for MFU: run.peak_tflops, else PEAK_TFLOPS by the GPU's name; None elsewhere."""
    if cfg.run.peak_tflops:
        return cfg.run.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(model: MultimodalLM, seq: int, labelled: float, reference: bool = False) -> float:
    """The model's FLOPs per token of a step on rows of `seq` tokens, `labelled` of them labelled: the frozen
    weights' forward and backward to their inputs (4 per weight), lm_head's at labelled positions only, the trainable
    weights' 6, and attention's scores and sums (6 * layers * seq * heads * head_dim). `reference`: DPO's step,
    which also runs a forward without adapters (2 FLOPs a weight, no gradients)."""
    c = model.llm.config
    lm_head = c.vocab_size * c.hidden_size
    body = sum(p.numel() for p in model.llm.model.layers.parameters() if not p.requires_grad)
    body += sum(m.in_features * m.out_features for m in model.llm.model.layers.modules() if isinstance(m, NF4Linear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim
    return 4 * body + 4 * lm_head * labelled + 6 * trainable + 6 * attention \
        + reference * (2 * body + 2 * lm_head * labelled + 2 * attention)


def model_flops_utilization(model: MultimodalLM | align.AlignModel, micro: list[data.Batch], tokens_per_s: float,
                            peak: float | None, world: World) -> float | None:
    """MFU at the last step's shape (its rows' length and share of labelled tokens): the model's FLOP/s on all
    ranks over their peak; None without a peak (a CPU) or in Phase 1."""
    if peak is None or isinstance(model, align.AlignModel):
        return None
    tokens = sum(sum(b.lengths) for b in micro)
    labelled = sum(int((b.labels != -100).sum()) for b in micro) / max(tokens, 1)
    seq = max(b.input_ids.shape[1] for b in micro)
    return flops_per_token(model, seq, labelled) * tokens_per_s / (peak * world.size)


# ----------------------------------------------------------------------------------------------------------------
# Eval: validation loss (all and per modality) and exact-match accuracy of greedy answers



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
    want, samples = cfg.run.tracker_samples if cfg.run.trackers and world.master else 0, []

    def scored(i: int, tokens: list[int], answer: str) -> None:  # counted, and the first answers kept for trackers
        match = score(tokens, answer, tokenizer)
        correct.add_(match)
        if len(samples) < want:
            samples.append(prediction_sample(ds, i, tokens, answer, bool(match[0]), tokenizer))
    if sharded:
        model.unshard()  # generation calls the model's parts directly, past the hooks that gather their weights
        for s in range(0, -(-n_gen // world.size), cfg.train.batch_size):
            pairs = [(i, *p) for i, p in ((i, ds.prompt(i)) for i in gen[s:s + cfg.train.batch_size]) if p is not None]
            spare = pairs or [(0, *next(p for p in map(ds.prompt, range(len(ds))) if p is not None))]
            batch = data.collate([p for _, p, _ in spare], tokenizer.pad_id).to(world.device)
            with autocast():
                outs = model.generate(batch, cfg.train.max_new_tokens, stop_ids=())
            for o, (i, _, answer) in zip(outs, pairs):
                scored(i, o, answer)
        model.reshard()
    else:  # generate.py --predict's path: batches of similar length, prompts made in workers, recorded decode steps
        # and continuous batching on a GPU (the loader draws no number from the run's RNG: resuming after an
        # evaluation draws the same masks)
        prompts = data.prompt_batches(ds, gen, 256, 1 << 16, cfg.train.max_new_tokens, tokenizer.pad_id,
                                      world.device, cfg.data.num_workers)
        with autocast(cache_enabled=False):  # a recording keeps no cast weights between replays
            for answered in model.answer_batches(((list(zip(kept, answers)), batch)
                                                  for kept, answers, _, batch in prompts if batch is not None),
                                                 cfg.train.max_new_tokens,
                                                 tokenizer.stop_ids, rows=256, slots=1 << 16,
                                                 decoder=choose_decoder(model.llm, merge=False)):
                for (i, answer), o in answered:
                    scored(i, o, answer)
    correct = all_sum(correct.to(world.device), world)
    row["correct"], row["answered"] = int(correct[0]), int(correct[1])
    row["accuracy"] = row["correct"] / row["answered"] if row["answered"] else None
    if want:
        row["samples"] = samples
    model.train()
    return row


def score(tokens: list[int], answer: str, tokenizer: Tokenizer) -> torch.Tensor:
    """(1 if the answer, cut at its first stop token, is the reference under `normalize_answer`, else 0; 1)."""
    tokens = until_stop(tokens, tokenizer.stop_ids)
    return torch.tensor([float(data.normalize_answer(tokenizer.decode(tokens)) == data.normalize_answer(answer)), 1.0],
                        device=torch.device("cpu"))


def prediction_sample(ds: data.ConversationDataset, i: int, tokens: list[int], answer: str, correct: bool,
                      tokenizer: Tokenizer) -> dict:
    """One validation answer as the trackers show it: the question, the answer given, the reference, whether they
    match, and the sample's first image ((H, W, 3) uint8) and first audio clip ((waveform, sample rate, file))."""
    ex = ds.examples[i]
    last = max(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(ex.messages[:last]) if m["role"] == "user"), "")
    sample = {"id": ex.id, "question": question, "prediction": tokenizer.decode(until_stop(tokens, tokenizer.stop_ids)),
              "reference": answer, "correct": correct, "images": [], "audio": []}
    rate = ds.aligner_config.sample_rate
    with contextlib.suppress(Exception):  # a medium that no longer decodes is left out of the table
        sample["images"] = [load_image(p).permute(1, 2, 0).numpy() for p in ex.media["image"][:1]]
        sample["audio"] = [(load_audio(p, rate).numpy(), rate, p) for p in ex.media["audio"][:1]]
    return sample


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
        return GraphedStep(step, opt, world.device, cfg.data.pad_multiple)
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


def tracker_tags(cfg: Config, world: World) -> dict:
    """The tracked run's tags: the git commit of the code, the phase, the world size and every rank's device,
    counted ("8 x NVIDIA H100 80GB HBM3"). Every rank calls it (the names are gathered)."""
    name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
    names = [name] * world.size
    if world.size > 1:
        dist.all_gather_object(names, name)
    devices = ", ".join(f"{n} x {k}" for k, n in collections.Counter(names).items())
    return {"git_commit": (track.git_commit() if world.master else None) or "none", "phase": cfg.train.phase,
            "world_size": world.size, "devices": devices}


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID")


DEMO_STOPPED = 3  # demo.py's exit code when a signal stopped its Phase 1 (an emergency checkpoint was saved)


class Stopped(Exception):
    """A signal stopped the run before its loop began (in the demo's Phase 1), with an emergency checkpoint."""


def make_demo(folder: str, phase1: bool, device: torch.device) -> None:
    """`data.make_demo`: the demo's assets in `folder` (with `phase1`, its aligner too) unless they are there, made by
    `python demo.py` in a process of its own, on `device`, outside torchrun's group. The demo sits above training
    (its Phase 1 is a run of this file's loop), so this file starts it and never imports it."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    cmd = [sys.executable, str(Path(__file__).with_name("demo.py")), folder, "--device", str(device)]
    done = subprocess.run(cmd + ["--phase1"] * phase1, env=env)
    if done.returncode == DEMO_STOPPED:
        raise Stopped(f"the demo's Phase 1 saved an emergency checkpoint in {Path(folder) / 'align'}; run the "
                      "command again to resume it")
    if done.returncode != 0:
        raise RuntimeError(f"demo.py could not make the demo in {folder} (exit code {done.returncode}); its output "
                           "above says why. Run the command again to continue where it stopped")


def prepare_out_dir(cfg: Config, world: World) -> RunLock | None:
    """Rank 0 makes out_dir, checks that a fresh start writes over no earlier run, locks it, clears what writers
    that died left half-written, writes config.json and the demo's assets if asked; the other ranks wait for it, and
    all stop if it could not. Returns rank 0's lock."""
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
                check_fresh_start(cfg)  # before the lock, which writes its holder into run.lock
                lock = RunLock(out_dir)
                remove_leftovers(out_dir, print)
                remove_leftovers(out_dir / "checkpoints", print)
                write_json(out_dir / "config.json", dataclasses.asdict(resolved_paths(cfg)))
                if cfg.data.make_demo:  # Phase 2 on the demo needs its aligner from Phase 1
                    make_demo(cfg.data.make_demo, phase1=cfg.train.phase == "instruct", device=world.device)
        except Exception as e:
            error = e
            if type(e) in (OSError, PermissionError):  # a read-only or full disk, a folder not ours
                error = CheckpointWriteError(f"cannot use run.out_dir = {str(out_dir)!r} ({type(e).__name__}: {e}); "
                                             "give a folder this process can write to")
            if lock is not None:
                lock.release()
    if any_rank(error is not None, world):
        raise error or RunFolderError(f"rank 0 could not prepare run.out_dir = {cfg.run.out_dir!r}; its error says "
                                      "why")
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


def train_row(run: TrainState, out: StepOutput, opt, elapsed: float, tokens: int, waited: float, mfu: float | None,
              skipped: int, epoch_size: int, world: World, cfg: Config) -> dict:
    """The metrics row of the last step (its loss; speed, MFU and the seconds a step waited for the data loader,
    over the steps since the last row), printed by rank 0."""
    kind = objective(cfg)
    unit = UNITS[kind]
    row = {"step": run.step, "epoch": run.consumed / epoch_size, "split": "train", "loss": None,
           "lr": float(opt.param_groups[-1]["lr"]),
           "grad_norm": out.grad_norm.item(), unit: int(out.n_tokens.item()), f"{unit}_per_s": tokens / elapsed,
           "step_time": elapsed / cfg.run.log_every, "mfu": mfu, "data_wait": waited / cfg.run.log_every,
           "peak_mem_gib": round(peak_memory_gib(world.device), 3),
           "bad_steps": run.bad_steps, "skipped_samples": skipped}
    row.update(dpo.metrics(out.stats, cfg.train) if kind == "dpo" else
               {"loss": (out.stats[0] / out.n_tokens).item(), **group_losses(out.stats[1:], kind)})
    if world.master:
        eta = (cfg.train.max_steps - run.step) * row["step_time"]
        speed = f"{row[f'{unit}_per_s']:,.0f} {'tok' if unit == 'tokens' else unit}/s"
        print(f"step {run.step:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {speed} | "
              f"ETA {data.duration(eta)} | {'mem' if world.device.type == 'cuda' else 'host mem'} "
              f"{row['peak_mem_gib']:.2f} GiB")
    return row


def fit(cfg: Config, world: World | None = None) -> dict:
    """Train as the config says (resuming where `train.resume` points) and export the result; returns the last
    logged row, with "step" and "stopped" (by a signal). `world` defaults to torchrun's processes."""
    world = world or setup_distributed(cfg)
    lock = prepare_out_dir(cfg, world)
    say = print if world.master else (lambda *a, **k: None)
    stop = StopRequest(say)
    out_dir = Path(cfg.run.out_dir)
    trackers = track.Trackers(cfg.run.trackers if world.master else [], out_dir, cfg.run.tracker_project,
                              cfg.run.tracker_artifacts, say)
    alerts = track.Alerts(cfg.run.alert_command, cfg.run.alert_spike, cfg.run.alert_stall_s, cfg.run.alert_slow,
                          out_dir, world.master, say)
    status, error = "crashed", None
    try:
        result = train_loop(cfg, world, stop, trackers, alerts)
        status = "stopped" if result["stopped"] else "finished"
        return result
    except BaseException as e:
        error = e
        raise
    finally:
        alerts.close(status, error)
        results = [out_dir / ("aligner" if cfg.train.phase == "align" else "export")] if status == "finished" else []
        trackers.close([p for p in [out_dir / "config.json", *results] if p.exists()], status,
                       timeout=0 if isinstance(error, KeyboardInterrupt) else track.CLOSE_TIMEOUT)  # Ctrl-C twice
        stop.restore()
        if lock is not None:
            lock.release()


def train_loop(cfg: Config, world: World, stop: StopRequest, trackers: track.Trackers, alerts: track.Alerts) -> dict:
    """`fit` inside its locked run folder, with signals caught, watched by `trackers` and `alerts`."""
    out_dir, ckpt_dir = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "checkpoints"
    log = print if world.master else (lambda *a, **k: None)

    tokenizer, model = build_model(cfg, world.device, world=world)
    phase1 = isinstance(model, align.AlignModel)
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
    if world.master:
        trim_metrics(out_dir, run.step, log)
    if cfg.run.trackers:  # the tracked run: a new one, or the one this resume continues
        trackers.start(track.flatten(dataclasses.asdict(resolved_paths(cfg))), tracker_tags(cfg, world), run.step)
    kind = objective(cfg)
    metrics = Metrics(out_dir, world.master, metric_fields(kind), trackers, alerts)
    peak = peak_flops(cfg, world.device)
    bad_seen: set[tuple] = set()  # samples that failed to decode during training, on this rank
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world.size

    save = functools.partial(save_checkpoint, run=run, model=model, opt=opt, scaler=scaler, world=world, cfg=cfg,
                             epoch_size=len(train_ds), alerts=alerts,  # save("step_0000100"): the run as it is then
                             start_hash=read_start(cfg.train.init_from).hash if cfg.train.init_from else None)
    if kind == "dpo" and run.step == 0 and val_ds is not None:  # the start's figures, which DPO is to improve on
        row = evaluate(model, val_ds, cfg, world, tokenizer, autocast)
        metrics.log({"step": 0, "epoch": 0.0, "split": "val", **row})
        log(f"eval step 0 (the start) | val loss {row['loss']:.4f} | {eval_summary(row)}")
    loader = iter(make_loader(train_ds, cfg, world, tokenizer, run.consumed))
    t_last, tokens_since, waited, last_row = time.perf_counter(), 0, 0.0, {}
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        while run.step < cfg.train.max_steps:
            set_lr(opt, lr_factor(run.step, cfg.train))
            t_wait = time.perf_counter()
            micro = [next(loader) for _ in range(cfg.train.grad_accum)]
            waited += time.perf_counter() - t_wait
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
            alerts.beat(run.step)  # the watchdog's clock (from the first step on: it compiles, records graphs)
            if run.bad_in_row >= cfg.train.max_bad_steps:
                why = (f"{run.bad_in_row} non-finite steps in a row (max_bad_steps = {cfg.train.max_bad_steps}): the "
                       "loss or the gradients overflow")
                alerts.fire("nonfinite", f"{why}; the run stops at step {run.step}", run.step)
                save("emergency")
                raise RuntimeError(f"{why}. Emergency checkpoint in {ckpt_dir / 'emergency'}; lower the learning "
                                   "rates, use amp = bf16 or fp32, or check the data")
            last = run.step == cfg.train.max_steps
            if finite and (run.step % cfg.run.log_every == 0 or last):
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                skipped_now = skipped + int(all_sum(torch.tensor(float(len(bad_seen)), device=world.device), world))
                elapsed = time.perf_counter() - t_last
                mfu = model_flops_utilization(model, micro, tokens_since / elapsed, peak, world)
                last_row = train_row(run, out, opt, elapsed, tokens_since, waited, mfu, skipped_now, len(train_ds),
                                     world, cfg)
                metrics.log(last_row)
                t_last, tokens_since, waited = time.perf_counter(), 0, 0.0
            if finite and val_ds is not None and (last or cfg.train.eval_every
                                                  and run.step % cfg.train.eval_every == 0):
                row = (evaluate_align if phase1 else evaluate)(model, val_ds, cfg, world, tokenizer, autocast)
                samples = row.pop("samples", None)  # answers for the trackers' table
                metrics.log({"step": run.step, "epoch": run.consumed / len(train_ds), "split": "val", **row}, samples)
                log(f"eval step {run.step} | val loss {row['loss']:.4f} | {eval_summary(row)}")
                last_row = {**last_row, "val": row}
                if row["loss"] < run.best:
                    run.best = row["loss"]
                    save("best")
                t_last = time.perf_counter()
                alerts.beat(run.step)
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
    ap.add_argument("--check", action="store_true", help="check the config and run.out_dir without loading the "
                    "model (`check_start`), print run.out_dir and exit: launch.sh's first step")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    try:
        if args.check:
            check_start(cfg)
            print(cfg.run.out_dir)
            return
        if args.build_feature_cache:
            build_cache(cfg)
            return
        result = fit(cfg)
    except (ValueError, FileNotFoundError, CheckpointWriteError, RunFolderError) as e:  # bad input: a sample, a
        print(f"error: {e}", file=sys.stderr, flush=True)  # file, a checkpoint, a setup, a folder in use; each
        sys.exit(2)  # names what is at fault and what to do
    except Stopped as e:
        print(f"stop requested: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    if result.get("stopped"):
        sys.exit(1)


def check_start(cfg: Config) -> None:
    """What would stop the run as it starts, checked without reading any weights (launch.sh runs it before
    torchrun, which would start a stopped run again): run.out_dir held by no other run, and, with train.resume =
    "none", holding no earlier run's checkpoints; with model.quantize = "nf4", blocks of model.quant_block that fit
    every layer of the base (read from its config.json, where it is there already)."""
    out_dir = Path(cfg.run.out_dir)
    if (out_dir / "run.lock").is_file():
        RunLock(out_dir, probe=True)
    check_fresh_start(cfg)
    if cfg.model.quantize == "nf4" and (Path(cfg.model.llm) / "config.json").is_file():
        check_blocks(llm_skeleton(cfg.model.llm)[0], cfg.model.llm, cfg.model.quant_block)


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

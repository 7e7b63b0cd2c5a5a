"""Training of mmlora, both phases in one torchrun-driven DDP loop: Phase 2 (train.phase = "instruct") trains
projectors + LoRA on multimodal conversations; Phase 1 (train.phase = "align", align.py) trains the aligner on
image-text, audio-text and image-audio pairs.

    python train.py --config configs/demo.toml                                  # one process (CPU or one GPU)
    python train.py --config configs/demo-align.toml                            # Phase 1 -> <out_dir>/aligner/
    torchrun --nproc_per_node=8 train.py --config configs/qwen2.5-0.5b.toml     # DDP; or: bash launch.sh CONFIG
    python train.py --config configs/demo.toml --train.max_steps=20 --run.out_dir=runs/x   # overrides

Read top to bottom: data stream -> schedule -> checkpoints -> the step -> the loop (`fit`, `train_loop`, then what
each of its lines calls). What the loop leans on lives in files named for it: config.py (the TOML sections and their
checks), build.py (the model), distributed.py (ranks, collectives, DDP and FSDP2's sharding, train.strategy =
"fsdp"), checkpoint.py (the run folder: lock, checkpoints, resume or start, export), step_graph.py (the whole step as
CUDA graphs, train.cuda_graph, an opt-in wrapper around `train_step`), metrics.py (the metrics rows, losses per
group, MFU), evaluation.py (validation loss, accuracy, recall) and track.py (MLflow, TensorBoard and W&B fed with the
metrics rows, alerts on a sick run, the heartbeat file).
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
import dataclasses
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
from model import llm_skeleton
from tokenizer import Tokenizer, load_tokenizer
from encoders import Aligner, load_aligner
from multimodal import MultimodalLM, parameter_report
from quant import check_blocks
from preference import PreferenceDataset, collate_preferences
from step_graph import GraphedStep
from config import Config, TrainConfig, load_config
from distributed import (World, all_sum, any_rank, average_gradients, data_parallel, gradient_sync, is_sharded,
    setup_distributed, whole)
from metrics import (UNITS, Metrics, MetricsWriteError, group_losses, group_sums, metric_fields,
                     model_flops_utilization, objective, peak_flops, peak_memory_gib, trim_metrics)
from evaluation import eval_summary, evaluate, evaluate_align
from checkpoint import (CheckpointWriteError, RunFolderError, RunLock, TrainState, check_fresh_start, export,
    optimizer_state, read_start, remove_leftovers, resume_or_start, rng_state, start_folder, trainable_state,
    write_checkpoint, write_folder)
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
    elif isinstance(ds, PreferenceDataset):
        def collate(items):
            return collate_preferences(items, tokenizer.pad_id, multiple)
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
    kind = PreferenceDataset if cfg.train.objective == "dpo" else data.ConversationDataset
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
    bit-identical and fp32 copies would only take memory (twice the bf16 copies' bytes). Norms, embeddings
    and positions stay fp32, as autocast runs their ops in fp32. From then on the module runs under autocast only;
    its weights on disk stay the truth (`export` copies them from there)."""
    if not autocast.keywords["enabled"]:
        return
    for m in frozen.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.to(autocast.keywords["dtype"])


class StepOutput(NamedTuple):
    """A step's results, on the device: nothing in a step waits for the GPU."""
    stats: torch.Tensor  # SFT and Phase 1 (7,): loss sum, then loss and count of text-only, image, audio samples;
    # DPO (dpo.STATS,): `dpo.pair_terms`' sums
    n_tokens: torch.Tensor  # (): the step's labelled tokens (Phase 1 and DPO: pairs) on all ranks
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
    gradients = functools.partial(dpo.forward_backward, cfg=cfg.train) if cfg.train.objective == "dpo" \
        else forward_backward
    if cfg.train.cuda_graph:
        step = functools.partial(train_step, model, opt=opt, scaler=scaler, params=params,
                                 autocast=lambda: autocast(cache_enabled=False), world=world,
                                 grad_clip=cfg.train.grad_clip, average=True, gradients=gradients)
        return GraphedStep(step, opt, world.device, cfg.data.pad_multiple)
    ddp = data_parallel(model, world)
    return functools.partial(train_step, ddp, opt=opt, scaler=scaler, params=params, autocast=autocast, world=world,
                             grad_clip=cfg.train.grad_clip, gradients=gradients)


# ----------------------------------------------------------------------------------------------------------------
# The loop


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
    log = print if world.master else (lambda *a, **k: None)
    parts = setup(cfg, world, trackers, alerts, log)
    run = parts.run
    if objective(cfg) == "dpo" and run.step == 0 and parts.val_ds is not None:  # the figures DPO is to improve on
        evaluate_and_log(parts, " (the start)")
    loader = iter(make_loader(parts.train_ds, cfg, world, parts.tokenizer, run.consumed))
    progress = Progress(cfg, world)
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        while run.step < cfg.train.max_steps:
            set_lr(parts.opt, lr_factor(run.step, cfg.train))
            micro = progress.next_step(loader)
            out = parts.step([b.to(world.device) for b in micro])
            finite = bool(out.finite)
            parts.opt.zero_grad(set_to_none=True)
            count_step(parts, finite)
            if after_step(parts, out, micro, finite, progress, stop):
                return {**progress.last_row, "stopped": True, "step": run.step}
    except Exception as e:
        # weights and optimizer are whole between steps: rank 0 saves them (as every rank's step); not where the
        # stop saved them already, nor where a step's row could not be logged, so that the resumed run logs it again
        if run.step > 0 and not isinstance(e, (CheckpointWriteError, MetricsWriteError, NonFiniteStop)):
            with contextlib.suppress(Exception):
                parts.save("emergency", collective=False)
        raise
    finish(parts)
    return {**progress.last_row, "stopped": False, "step": run.step}


# ----------------------------------------------------------------------------------------------------------------
# What the loop calls: its parts, made once (`setup`), then the account of each step and what follows it


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


class NonFiniteStop(RuntimeError):
    """train.max_bad_steps non-finite steps in a row stopped the run, once every rank saved the emergency
    checkpoint."""


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


def unwritable(out_dir: Path, e: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(f"cannot use run.out_dir = {str(out_dir)!r} ({type(e).__name__}: {e}); give a "
                                "folder this process can write to")


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
            error = unwritable(out_dir, e)
        try:
            if error is None:
                check_fresh_start(cfg)  # before the lock, which writes its holder into run.lock
                if cfg.train.init_from:  # there, before the demo's Phase 1 runs
                    start_folder(cfg.train.init_from)
                lock = RunLock(out_dir)
                remove_leftovers(out_dir, print)
                remove_leftovers(out_dir / "checkpoints", print)
                write_json(out_dir / "config.json", dataclasses.asdict(resolved_paths(cfg)))
                if cfg.data.make_demo:  # Phase 2 on the demo needs its aligner from Phase 1
                    make_demo(cfg.data.make_demo, phase1=cfg.train.phase == "instruct", device=world.device)
        except Exception as e:
            error = e
            if type(e) in (OSError, PermissionError):  # a read-only or full disk, a folder not ours
                error = unwritable(out_dir, e)
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


def train_row(run: TrainState, out: StepOutput, opt, elapsed: float, steps: int, tokens: int, waited: float,
              mfu: float | None, skipped: int, epoch_size: int, world: World, cfg: Config) -> dict:
    """The metrics row of the last step (its loss; speed, MFU and the seconds a step waited for the data loader,
    over the `steps` since the last row, which took `elapsed` seconds), printed by rank 0."""
    kind = objective(cfg)
    unit = UNITS[kind]
    row = {"step": run.step, "epoch": run.consumed / epoch_size, "split": "train", "loss": None,
           "lr": float(opt.param_groups[-1]["lr"]),
           "grad_norm": out.grad_norm.item(), unit: int(out.n_tokens.item()), f"{unit}_per_s": tokens / elapsed,
           "step_time": elapsed / steps, "mfu": mfu, "data_wait": waited / steps,
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


class Parts(NamedTuple):
    """What the loop trains and reports with, made once before the first step (`setup`)."""
    cfg: Config
    world: World
    log: Callable[..., None]  # print on rank 0, silent elsewhere
    alerts: track.Alerts
    model: MultimodalLM | align.AlignModel
    tokenizer: Tokenizer
    train_ds: data.ConversationDataset | data.PairDataset
    val_ds: data.ConversationDataset | data.PairDataset | None
    skipped: int  # samples the datasets left out as they were read (listed in skipped.jsonl)
    opt: torch.optim.Optimizer
    autocast: functools.partial
    step: Callable[[list], StepOutput]  # `make_step`'s
    run: TrainState  # where the run stands, updated in place step by step
    metrics: Metrics
    save: Callable[..., None]  # save("step_0000100"): the run as it is then (`save_checkpoint`)
    peak: float | None  # one device's peak FLOP/s, for MFU


def setup(cfg: Config, world: World, trackers: track.Trackers, alerts: track.Alerts, log) -> Parts:
    """The model and its data, the optimizer and mixed precision, the run resumed or started (checkpoint.py), its
    step, where its rows go and how it saves a checkpoint."""
    tokenizer, model = build_model(cfg, world.device, world=world)
    phase1 = isinstance(model, align.AlignModel)
    log(parameter_report(parameter_groups(model)))
    train_ds, val_ds, skipped = load_datasets(cfg, tokenizer, model.aligner, world, log)
    opt, params = make_optimizer(model, cfg.train)
    scaler, autocast = mixed_precision(cfg.train, world.device)
    if not phase1:  # after the datasets checked their feature cache against the aligner's fp32 weights
        store_for_autocast(model.aligner, autocast)
    run = resume_or_start(cfg, model, opt, scaler, world, log)
    step = make_step(model, opt, scaler, params, autocast, world, cfg)  # after a resume: graphs keep its state
    model.train()
    metrics = start_metrics(cfg, world, run.step, trackers, alerts, log)
    save = functools.partial(save_checkpoint, run=run, model=model, opt=opt, scaler=scaler, world=world, cfg=cfg,
                             epoch_size=len(train_ds), alerts=alerts,
                             start_hash=read_start(cfg.train.init_from).hash if cfg.train.init_from else None)
    return Parts(cfg, world, log, alerts, model, tokenizer, train_ds, val_ds, skipped, opt, autocast, step, run,
                 metrics, save, peak_flops(cfg, world.device))


def start_metrics(cfg: Config, world: World, step: int, trackers: track.Trackers, alerts: track.Alerts,
                  log) -> Metrics:
    """Where the run's rows go: metrics.csv and metrics.jsonl, cut back to `step` (a resumed run logs the steps
    after it again), and the trackers, started on the tracked run (a new one, or the one this resume continues)."""
    out_dir = Path(cfg.run.out_dir)
    if world.master:
        trim_metrics(out_dir, step, log)
    if cfg.run.trackers:
        trackers.start(track.flatten(dataclasses.asdict(resolved_paths(cfg))), tracker_tags(cfg, world), step)
    return Metrics(out_dir, world.master, metric_fields(objective(cfg)), trackers, alerts)


class Progress:
    """The loop's account since the last metrics row: the steps taken, the tokens (Phase 1 and DPO: pairs) this rank
    processed, the seconds since the row (evaluations left out) and those spent waiting for the data loader; and the
    samples that failed to decode on this rank, and the last row logged (what `fit` returns)."""

    def __init__(self, cfg: Config, world: World):
        self.cfg, self.world = cfg, world
        self.pairs = UNITS[objective(cfg)] == "pairs"
        self.bad_seen: set[tuple] = set()  # (file, line) of the samples that failed to decode, on this rank
        self.last_row: dict = {}
        self.restart()

    def restart(self) -> None:
        self.since, self.steps, self.tokens, self.waited = time.perf_counter(), 0, 0, 0.0

    def next_step(self, loader) -> list[data.Batch]:
        """The next step's micro-batches: the wait for them timed, their tokens counted, bad samples listed."""
        t0 = time.perf_counter()
        micro = [next(loader) for _ in range(self.cfg.train.grad_accum)]
        self.waited += time.perf_counter() - t0
        list_skipped(micro, self.bad_seen, Path(self.cfg.run.out_dir), self.world)
        self.steps += 1
        self.tokens += sum(len(b.ids) if self.pairs else sum(b.lengths) for b in micro)
        return micro


def count_step(parts: Parts, finite: bool) -> None:
    """The run's counters after a step: the samples it consumed (counted after it: a crash inside the step re-reads
    them on resume), and the step if it was finite; a non-finite one, skipped on the device, counts as bad, and
    train.max_bad_steps of those in a row stop the run with an emergency checkpoint."""
    run, cfg = parts.run, parts.cfg
    run.consumed += cfg.train.batch_size * cfg.train.grad_accum * parts.world.size
    if finite:
        run.step, run.bad_in_row = run.step + 1, 0
    else:
        run.bad_in_row, run.bad_steps = run.bad_in_row + 1, run.bad_steps + 1
        parts.log(f"step {run.step}: non-finite loss or gradient norm; step skipped ({run.bad_in_row} in a row)")
    parts.alerts.beat(run.step)  # the watchdog's clock (from the first step on: it compiles, records graphs)
    if run.bad_in_row >= cfg.train.max_bad_steps:
        why = (f"{run.bad_in_row} non-finite steps in a row (max_bad_steps = {cfg.train.max_bad_steps}): the loss or "
               "the gradients overflow")
        parts.alerts.fire("nonfinite", f"{why}; the run stops at step {run.step}", run.step)
        parts.save("emergency")
        raise NonFiniteStop(f"{why}. Emergency checkpoint in {Path(cfg.run.out_dir) / 'checkpoints' / 'emergency'}; "
                           "lower the learning rates, use amp = bf16 or fp32, or check the data")


def after_step(parts: Parts, out: StepOutput, micro: list, finite: bool, progress: Progress,
               stop: StopRequest) -> bool:
    """What follows a step: after a finite one, its metrics row every run.log_every steps and at the last, and an
    evaluation every train.eval_every steps and at the last (a better validation loss saved as `best`); then on any
    rank's stop request an emergency checkpoint, and True (the run stops); else after a finite step a checkpoint
    every train.save_every steps and at the last."""
    run, cfg = parts.run, parts.cfg
    last = run.step == cfg.train.max_steps
    if finite and (run.step % cfg.run.log_every == 0 or last):
        progress.last_row = log_step(parts, out, micro, progress)
    if finite and parts.val_ds is not None and (last or cfg.train.eval_every and run.step % cfg.train.eval_every == 0):
        t0 = time.perf_counter()
        row = evaluate_and_log(parts)
        progress.last_row = {**progress.last_row, "val": row}
        if row["loss"] < run.best:
            run.best = row["loss"]
            parts.save("best")
        progress.since += time.perf_counter() - t0  # the next row's speed is the training steps' (no eval or save)
        parts.alerts.beat(run.step)
    if any_rank(stop.flag, parts.world):
        parts.save("emergency")
        parts.log(f"stop requested: emergency checkpoint at step {run.step} in "
                  f"{Path(cfg.run.out_dir) / 'checkpoints' / 'emergency'}")
        return True
    if finite and (last or cfg.train.save_every and run.step % cfg.train.save_every == 0):
        parts.save(f"step_{run.step:07d}")
    return False


def log_step(parts: Parts, out: StepOutput, micro: list, progress: Progress) -> dict:
    """The metrics row of the step just taken, over the steps since the last row, logged; the account restarts."""
    world = parts.world
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    counts = torch.tensor([len(progress.bad_seen), progress.tokens], device=world.device)
    bad_seen, tokens = all_sum(counts, world).tolist()  # on all ranks
    elapsed = time.perf_counter() - progress.since
    mfu = model_flops_utilization(parts.model, micro, tokens / elapsed, parts.peak, world)
    row = train_row(parts.run, out, parts.opt, elapsed, progress.steps, tokens, progress.waited, mfu,
                    parts.skipped + bad_seen, len(parts.train_ds), world, parts.cfg)
    parts.metrics.log(row)
    progress.restart()
    return row


def evaluate_and_log(parts: Parts, when: str = "") -> dict:
    """The validation set's row (Phase 1's `evaluate_align`, else `evaluate`), logged with the answers for the
    trackers' table, and said."""
    run, phase1 = parts.run, isinstance(parts.model, align.AlignModel)
    row = (evaluate_align if phase1 else evaluate)(parts.model, parts.val_ds, parts.cfg, parts.world,
                                                    parts.tokenizer, parts.autocast)
    samples = row.pop("samples", None)
    parts.metrics.log({"step": run.step, "epoch": run.consumed / len(parts.train_ds), "split": "val", **row}, samples)
    parts.log(f"eval step {run.step}{when} | val loss {row['loss']:.4f} | {eval_summary(row)}")
    return row


def finish(parts: Parts) -> None:
    """The run's result: Phase 1's aligner (written with each checkpoint), or Phase 2's export folder (under FSDP
    made from the last checkpoint afterwards: the merged LLM would not fit one rank)."""
    out_dir, log = Path(parts.cfg.run.out_dir), parts.log
    if isinstance(parts.model, align.AlignModel):
        log(f"Phase 1's aligner (for Phase 2's model.aligner) is in {out_dir / 'aligner'}")
    elif parts.cfg.train.strategy == "fsdp":
        log(f"export: python generate.py --run {out_dir} --export {out_dir / 'export'} (loads the base on one device "
            "or the CPU)")
    elif parts.world.master:
        export(parts.model, out_dir / "export", parts.cfg)
        log(f"exported the adapter (peft format), the merged LLM, projectors and aligner to {out_dir / 'export'}")


# ----------------------------------------------------------------------------------------------------------------
# The command line


def arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """train.py's own options, and the config overrides (--section.key=value)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Any config key can be overridden: --section.key=value")
    ap.add_argument("--config", help="TOML config (configs/*.toml)")
    ap.add_argument("--build_feature_cache", action="store_true",
                    help="compute the aligner's features of data.train_file and data.val_file into data.feature_cache, "
                         "then exit")
    ap.add_argument("--check", action="store_true", help="check the config and run.out_dir without loading the "
                    "model (`check_start`), print run.out_dir and exit: launch.sh's first step")
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, overrides = arguments(argv)
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
    # bad input (a sample, a file, a checkpoint, a setup), a folder in use or a disk that is full: each error names
    # what is at fault and what to do
    except (ValueError, FileNotFoundError, CheckpointWriteError, MetricsWriteError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
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
    "none", holding no earlier run's checkpoints; train.init_from a run, checkpoint or export; with model.quantize =
    "nf4", blocks of model.quant_block that fit every layer of the base (read from its config.json, where it is there
    already)."""
    out_dir = Path(cfg.run.out_dir)
    if (out_dir / "run.lock").is_file():
        RunLock(out_dir, probe=True)
    check_fresh_start(cfg)
    if cfg.train.init_from:
        start_folder(cfg.train.init_from)
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

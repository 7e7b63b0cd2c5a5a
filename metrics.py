"""What a training run measures and where its rows go: metrics.csv and metrics.jsonl (one row per logged step and
per evaluation, written by rank 0 and passed on to the trackers and alerts of track.py), the loss of each group of
samples, peak memory, and the FLOPs a step does for its model FLOPs utilization (MFU).

    metrics = Metrics(out_dir, world.master, metric_fields(objective(cfg)), trackers, alerts)
    metrics.log({"step": 10, "split": "train", "loss": 1.23, ...})
    sums = group_sums(out, batch.groups())          # (6,): loss and count of text-only, image and audio samples
    group_losses(sums, "instruct")                  # {"loss_text": ..., "loss_image": ..., "loss_audio": ...}
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

import align
import data
import dpo
import track
from multimodal import LossOutput, MultimodalLM
from quant import NF4Linear
from config import Config
from distributed import World

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


class MetricsWriteError(OSError):
    """metrics.csv or metrics.jsonl could not be written (a full or read-only disk); the checkpoints are untouched."""


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
            try:
                self.csv.writerow({k: row.get(k, "") for k in self.fields})
                self.csv_file.flush()
                self.jsonl.write(json.dumps(row) + "\n")
                self.jsonl.flush()
            except OSError as e:  # a line cut short here is dropped when the run resumes (`trim_metrics`)
                raise MetricsWriteError(f"cannot write the metrics in {Path(self.jsonl.name).parent} "
                                        f"({e.strerror or e}) at step {row.get('step')}; the checkpoints are "
                                        "untouched: make room and run the same command again to resume from the "
                                        "last one") from None
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
    ranks over their peak; None without a peak (a CPU), and where the run counts pairs, not tokens (Phase 1, DPO)."""
    if peak is None or not isinstance(micro[0], data.Batch):
        return None
    tokens = sum(sum(b.lengths) for b in micro)
    labelled = sum(int((b.labels != -100).sum()) for b in micro) / max(tokens, 1)
    seq = max(b.input_ids.shape[1] for b in micro)
    return flops_per_token(model, seq, labelled) * tokens_per_s / (peak * world.size)

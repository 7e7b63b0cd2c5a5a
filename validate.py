"""Pre-flight checks of a training setup, on the same functions train.py uses; every check must pass.

    python validate.py --config configs/demo.toml [--quick] [--json results.json]

Prints a PASS/FAIL table with the time of each check, on a failure the reason and what to do, and exits non-zero
if any check fails. `launch.sh` runs it (with --quick) before starting torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import data
import demo
import dpo
import lora
import build
import train
from multimodal import MODALITIES, parameter_report
from preference import collate_preferences
from checkpoint import load_checkpoint, optimizer_state, rng_state, trainable_state, write_checkpoint
from config import Config, check_config, load_config
from metrics import Metrics, group_losses, group_sums, metric_fields, objective
from distributed import World


class CheckFailed(Exception):
    """A check's failure: what went wrong and what to do about it."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclasses.dataclass
class Setup:
    """What every check reads: the config as the checks run it, with the layers eager, the step unrecorded and the
    whole model in this process (what they check is the model, the data and the loop; compiling or recording, for
    speed and the latter on GPUs only, would cost each model they build its compilation, and train.strategy =
    "fsdp" is checked by the runs under torchrun); what the run itself uses instead; the device (a GPU node checks
    on its GPU), the tolerance of a comparison (bf16 autocast on a GPU, fp32 on a CPU) and a scratch folder."""
    cfg: Config
    quick: bool
    compile: str  # the run's train.compile
    cuda_graph: bool  # ... train.cuda_graph
    strategy: str  # ... train.strategy
    device: torch.device
    rtol: float
    scratch: Path

    @classmethod
    def of(cls, cfg: Config, quick: bool) -> Setup:
        checked = copy.deepcopy(cfg)
        checked.train.compile, checked.train.cuda_graph, checked.train.strategy = "none", False, "ddp"
        gpu = cfg.run.device != "cpu" and torch.cuda.is_available()
        return cls(checked, quick, cfg.train.compile, cfg.train.cuda_graph, cfg.train.strategy,
                   torch.device("cuda" if gpu else "cpu"), 1e-3 if gpu else 1e-5,
                   Path(tempfile.mkdtemp(prefix="mmlora-validate-")))

    @property
    def phase1(self) -> bool:  # Phase 1: the aligner on pairs (align.py)
        return self.cfg.train.phase == "align"

    @property
    def dpo(self) -> bool:  # preference pairs (dpo.py), from train.init_from's start
        return self.cfg.train.objective == "dpo"


class Report:
    """The table's rows, one per check in the order run: passed, seconds, the detail, and on a failure what to do."""

    def __init__(self, last: str | None = None):
        self.rows: list[dict] = []
        self.last = last  # no check runs after this one

    def run(self, name: str, check, needs: list[str] | None = None):
        """Time `check()` unless a check it `needs` did not pass (then it fails as not run). A check returns its
        detail, or (detail, what it made for the later checks); `run` returns what it made, None if nothing."""
        if self.last in (r["check"] for r in self.rows):
            return None
        missing = [n for n in needs or [] if not any(r["check"] == n and r["passed"] for r in self.rows)]
        t0, made = time.perf_counter(), None
        if missing:
            result = {"passed": False, "detail": f"not run: needs {', '.join(missing)}",
                      "fix": "fix the checks above first"}
        else:
            try:
                detail = check()
                detail, made = detail if isinstance(detail, tuple) else (detail, None)
                result = {"passed": True, "detail": detail or ""}
            except CheckFailed as e:
                result = {"passed": False, "detail": e.reason, "fix": e.fix}
            except Exception as e:  # an unexpected error is a failure of this check, with its origin
                where = traceback.extract_tb(e.__traceback__)[-1]
                result = {"passed": False, "detail": f"{type(e).__name__}: {e} ({Path(where.filename).name}:"
                          f"{where.lineno})", "fix": "read the error above; it names the file or key at fault"}
        self.rows.append({"check": name, "seconds": round(time.perf_counter() - t0, 2), **result})
        return made


def validate(cfg: Config, quick: bool = False, last: str | None = None) -> list[dict]:
    """Every check in order (up to the one named `last`), each given what the earlier ones made: the model, the
    dataset and its first batch. A check whose inputs an earlier check failed to make is not run."""
    s = Setup.of(cfg, quick)
    torch.manual_seed(cfg.train.seed)
    report = Report(last)
    run = report.run
    try:
        run("Configuration", lambda: configuration(s))
        tokenizer, model = run("Model initialization", lambda: model_init(s), ["Configuration"]) or (None, None)
        run("Parameter freezing", lambda: freezing(s, model), ["Model initialization"])
        ds, batch = run("Data pipeline", lambda: data_pipeline(s, tokenizer, model), ["Model initialization"]) \
            or (None, None)
        run("Forward pass", lambda: forward(s, model, batch), ["Data pipeline"])
        run("Training step", lambda: training_step(s, model, batch), ["Forward pass"])
        run("Checkpoint saving", lambda: checkpoint(s, model, batch), ["Data pipeline"])
        run("Metrics logging", lambda: metrics_logging(s))
        run("Short training run", lambda: short_run(s, batch), ["Data pipeline"])
        run("Distributed", lambda: distributed(s, ds), ["Data pipeline"])
        run("Resume", lambda: resume(s, ds), ["Data pipeline"])
    finally:
        shutil.rmtree(s.scratch, ignore_errors=True)
    return report.rows


# ----------------------------------------------------------------------------------------------------------------
# The checks, in order


def configuration(s: Setup) -> str:
    check_config(s.cfg)
    for key, path in (("model.llm", s.cfg.model.llm), ("model.aligner", s.cfg.model.aligner),
                      ("data.train_file", s.cfg.data.train_file)):
        if not Path(path).exists() and not s.cfg.data.make_demo:
            raise CheckFailed(f"{key} = {path!r} does not exist", f"set {key} to an existing path")
    if s.cfg.data.make_demo:
        demo.ensure_demo(s.cfg.data.make_demo, phase1=s.cfg.train.phase == "instruct", device=s.device)
    what = "Phase 1 (align)" if s.phase1 else f"{s.cfg.lora.targets} r={s.cfg.lora.rank}"
    return (f"{what}, batch {s.cfg.train.batch_size}, checked eager "
            f"(train.compile = {s.compile!r}, train.cuda_graph = {s.cuda_graph} when training)")


def model_init(s: Setup) -> tuple[str, tuple]:
    tokenizer, model = build.build_model(s.cfg, s.device)
    print(parameter_report(build.parameter_groups(model)))
    return f"{sum(p.numel() for p in model.parameters()):,} parameters", (tokenizer, model)


def freezing(s: Setup, model) -> str:
    groups = build.parameter_groups(model)
    if s.phase1:
        return freezing_phase1(s, model, groups)
    for part in ("aligner", "llm"):
        trainable = [p for p in groups[part] if p.requires_grad]
        if trainable:
            raise CheckFailed(f"{sum(p.numel() for p in trainable):,} parameters of the {part} are trainable",
                              f"the {part} must be frozen (encoders.load_aligner freezes the aligner, "
                              "lora.apply_lora the LLM): build the model with build.build_model")
    if s.dpo and any(p.requires_grad for p in groups["projectors"]):
        raise CheckFailed("the projectors are trainable in DPO", "they are the reference model's too: freeze "
                          "them (build.assemble does with train.objective = \"dpo\")")
    for part in ("lora",) if s.dpo else ("lora", "projectors"):
        if not groups[part] or not all(p.requires_grad for p in groups[part]):
            raise CheckFailed(f"the {part} parameters are not all trainable", "check lora.targets and the model")
    expected = sum(m.rank * (m.base_layer.in_features + m.base_layer.out_features)
                   for m in lora.outer_lora_modules(model.llm).values())
    got = sum(p.numel() for p in groups["lora"])
    if got != expected:
        raise CheckFailed(f"LoRA has {got:,} parameters, r*(in+out) gives {expected:,}", "check lora.py")
    return f"LoRA {got:,}, projectors {sum(p.numel() for p in groups['projectors']):,}" + \
        (" (frozen: the reference's too)" if s.dpo else "")


def freezing_phase1(s: Setup, model, groups: dict) -> str:
    if any(p.requires_grad for p in groups["llm"]):
        raise CheckFailed("the LLM has trainable parameters in Phase 1", "it embeds the text frozen: check align.py")
    heads = [p for m in MODALITIES for p in getattr(model.aligner, m).head.parameters()]
    if not all(p.requires_grad for p in heads + groups["text head"]):
        raise CheckFailed("the aligner's heads or the text head are frozen", "check align.AlignModel")
    towers = [p for n, p in model.aligner.named_parameters() if ".encoder.tower." in n and p.requires_grad]
    if towers:
        raise CheckFailed("a Hugging Face tower is trainable", "HF towers stay frozen: check align.AlignModel")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable (heads{', encoders' if s.cfg.train.align_encoders else ''}, text head)"


def data_pipeline(s: Setup, tokenizer, model) -> tuple[str, tuple]:
    """The training file read as train.py reads it, and its first batch checked: (detail, (dataset, batch))."""
    c = s.cfg
    try:
        ds = train.make_dataset(c, c.data.train_file, tokenizer, model.aligner)
    except data.SampleError as e:
        raise CheckFailed(str(e), "fix or remove that sample, or set data.on_error = \"skip\"") from None
    n = min(len(ds), c.train.batch_size)
    if s.phase1:
        return pairs_pipeline(s, tokenizer, ds, n)
    if s.dpo:
        return preferences_pipeline(s, tokenizer, model, ds, n)
    b = data.collate([ds[i] for i in range(n)], tokenizer.pad_id, c.data.pack, c.data.max_len).to(s.device)
    if b.input_ids.shape != b.labels.shape:
        raise CheckFailed("input_ids and labels differ in shape", "check data.collate")
    for ex in ds.examples[:n]:  # labels must be exactly the assistant replies and their end-of-turn tokens
        check_replies(tokenizer, f"sample {ex.id}", ex.input_ids, ex.labels, ex.messages)
    check_media(b, ds, model.media_token_ids, n, c.model.tokens_per_media)
    return f"{len(ds)} samples, batch {tuple(b.input_ids.shape)}, {len(b.label_index)} labels", (ds, b)


def check_replies(tokenizer, what: str, ids: list[int], labels: list[int], messages: list[dict]) -> None:
    """Labels must be exactly the assistant replies of `messages` and their end-of-turn tokens."""
    targets = [x for t, x in enumerate(labels) if x != -100 and x == ids[t + 1]]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    text = tokenizer.decode([x for x in targets if x != tokenizer.end_of_turn_id])
    same_text = "".join(text.split()) == "".join("".join(replies).split())
    if len(targets) != sum(x != -100 for x in labels) or not same_text \
            or targets.count(tokenizer.end_of_turn_id) < len(replies):
        raise CheckFailed(f"{what}: labels are not exactly its replies ({text!r} vs {replies!r})",
                          "check the chat format (model.chat_format) and data.encode_conversation")


def check_media(b: data.Batch, ds, media_token_ids: dict[str, int], n: int, K: dict[str, int],
                copies: int = 1) -> None:
    """The first n samples' media, once per sample, and their placeholders in the batch's rows (in `copies`
    rows per sample: a preference batch's chosen and rejected rows)."""
    for m in MODALITIES:
        placeholders = (b.input_ids == media_token_ids[m]).flatten().nonzero()[:, 0]
        count = sum(sum(ex.blocks[m]) if m in ex.blocks else len(ex.media[m])  # a long clip's windows
                    for ex in ds.examples[:n])
        if len(placeholders) != copies * count * K[m]:
            raise CheckFailed(f"{len(placeholders)} {m} placeholder tokens for {count} {m} inputs of {K[m]}"
                              + (f" in {copies} rows each" if copies > 1 else ""), "check the placeholders of the data")
        if m in b.media and len(b.media[m]) != count:
            raise CheckFailed(f"the batch holds {len(b.media[m])} {m} inputs for {count}: each sample's media "
                              "count once", "check preference.collate_preferences")
        if not torch.equal(b.media[m].slots if m in b.media else placeholders[:0], placeholders):
            raise CheckFailed(f"the collator's {m} slots are not the placeholder positions", "check data.collate")


def preferences_pipeline(s: Setup, tokenizer, model, ds, n: int) -> tuple[str, tuple]:
    """Preference pairs: both answers labelled exactly, after one prompt that both rows share, and the prompt's
    media counted once."""
    b = collate_preferences([ds[i] for i in range(n)], tokenizer.pad_id, s.cfg.data.pad_multiple).to(s.device)
    for ex in ds.examples[:n]:
        prompt = ex.messages[:ex.prompt_turns]
        for name, ids, labels, answer in (("chosen", ex.input_ids, ex.labels, ex.messages[ex.prompt_turns:]),
                                          ("rejected", ex.rejected_ids, ex.rejected_labels, ex.rejected)):
            check_replies(tokenizer, f"sample {ex.id} ({name})", ids, labels, answer)
        first = [next(t for t, x in enumerate(labels) if x != -100) for labels in (ex.labels, ex.rejected_labels)]
        if first[0] != first[1] or ex.input_ids[:first[0] + 1] != ex.rejected_ids[:first[0] + 1]:
            raise CheckFailed(f"sample {ex.id}: its chosen and rejected rows do not start with the same prompt "
                              f"({len(prompt)} turns)", "check preference.PreferenceDataset and the chat format")
    check_media(b.rows, ds, model.media_token_ids, n, s.cfg.model.tokens_per_media, copies=2)
    return (f"{len(ds)} preference pairs, batch {tuple(b.rows.input_ids.shape)} (chosen and rejected rows), "
            f"{len(b.rows.label_index)} labels"), (ds, b)


def pairs_pipeline(s: Setup, tokenizer, ds, n: int) -> tuple[str, tuple]:
    items = [ds[i] for i in range(n)]
    b = data.collate_pairs(items, tokenizer.pad_id).to(s.device)
    stack = [(m, i) for m in ("image", "audio", "text") for i, it in enumerate(items)
             if (it.text_ids is not None if m == "text" else m in it.media)]
    for i, it in enumerate(items):
        a, c = data.PAIR_KINDS[it.kind]
        if stack[b.left[i]] != (a, i) or stack[b.right[i]] != (c, i):
            raise CheckFailed(f"pair {it.id}: its sides do not index its own media", "check data.collate_pairs")
    kinds = ", ".join(f"{int((b.kind == k).sum())} {a}-{c}" for k, (a, c) in enumerate(data.PAIR_KINDS))
    return f"{len(ds)} pairs; a batch of {n}: {kinds}", (ds, b)


def forward(s: Setup, model, batch) -> str:
    if s.dpo:
        return preference_forward(s, model, batch)
    with torch.no_grad():
        out = model(batch)
    loss = (out.loss_sum / out.n_tokens).item()
    if not torch.isfinite(torch.tensor(loss)):
        raise CheckFailed(f"loss is {loss}", "check the model's weights and the data")
    per = group_losses(group_sums(out, batch.groups()), s.cfg.train.phase)
    return f"loss {loss:.4f}; " + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if v is not None)


def preference_forward(s: Setup, model, batch) -> str:
    """DPO at its start: the policy is its reference (the new adapters change nothing yet), so the loss is ln 2 and
    every reward 0."""
    with torch.no_grad():
        policy, reference, tokens = dpo.logps(model, model, batch)
        _, _, stats = dpo.pair_terms(policy, reference, tokens, batch.groups(), s.cfg.train)
    loss, margin = (stats[0] / batch.pairs).item(), float((policy - reference).abs().max())
    if not torch.isfinite(stats).all() or margin > 1e-3 * max(1.0, float(reference.abs().max())):
        raise CheckFailed(f"the policy is not its reference at the start (loss {loss}, log-ratios up to "
                          f"{margin:.2e})", "the run's new LoRA adapters must start at B = 0, and "
                          "lora.disable_adapters must turn off only them")
    return f"DPO loss {loss:.4f} at the start (ln 2 = 0.6931: the policy is its reference)"


def training_step(s: Setup, model, batch) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, opt = train_step_of(s, model)
    model.train()
    step([batch])
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.zero_grad(set_to_none=True)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if changed - trainable:
        raise CheckFailed(f"frozen tensors changed: {sorted(changed - trainable)[:3]}", "freeze them")
    if with_grad - changed:
        raise CheckFailed(f"tensors with gradient did not change: {sorted(with_grad - changed)[:3]}",
                          "check the optimizer's parameter groups")
    return f"{len(changed)} tensors changed, all trainable"


def train_step_of(s: Setup, model, lr: float | None = None):
    """train.py's step for `model` on this process (learning rates from the config, or all `lr`), and its
    optimizer."""
    cfg = copy.deepcopy(s.cfg)
    if lr is not None:
        cfg.train.lr_projector = cfg.train.lr_lora = cfg.train.lr_aligner = lr
    opt, params = train.make_optimizer(model, cfg.train)
    scaler, autocast = train.mixed_precision(cfg.train, s.device)
    return train.make_step(model, opt, scaler, params, autocast, World(device=s.device), cfg), opt


def checkpoint(s: Setup, model, batch) -> str:
    folder = Path(s.cfg.run.out_dir) / "validate-checkpoints"
    _, opt = train_step_of(s, model)
    scaler, _ = train.mixed_precision(s.cfg.train, s.device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = write_checkpoint(folder, "step_0000001", trainable_state(model), optimizer_state(model, opt), scaler,
                                {"step": 1, "consumed": 0, "best": 0.0, "bad_steps": 0}, [rng_state()])
    except OSError as e:
        raise CheckFailed(f"cannot write a checkpoint in {folder}: {e}",
                          "make run.out_dir a writable folder with free space") from None
    _, fresh = build.build_model(s.cfg, s.device)
    _, opt2 = train_step_of(s, fresh)
    load_checkpoint(path, fresh, opt2, scaler, World(), s.cfg.train.seed)
    a, b = trainable_state(model), trainable_state(fresh)
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise CheckFailed("reloaded tensors differ from the saved ones", "check checkpoint.write_checkpoint")
    model.eval(), fresh.eval()
    rows = batch.rows if s.dpo else batch  # (a preference batch's rows, as SFT rows)
    with torch.no_grad():
        la, lb = model(rows).loss_sum, fresh(rows).loss_sum
    if not torch.equal(la, lb):
        raise CheckFailed(f"next loss {la.item()} != {lb.item()} after reload", "check checkpoint.load_checkpoint")
    return f"{path.name}: identical tensors and next loss"


def metrics_logging(s: Setup) -> str:
    folder = s.scratch / "metrics"
    folder.mkdir()
    m = Metrics(folder, True, metric_fields(objective(s.cfg)))
    m.log({"step": 1, "split": "train", "loss": 1.5, "lr": 1e-4})
    m.log({"step": 1, "split": "val", "loss": 1.4, "accuracy": 0.5})
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    jl = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != 2 or float(rows[1]["loss"]) != 1.4 or jl[0]["lr"] != 1e-4:
        raise CheckFailed("metrics rows are not read back as written", "check metrics.Metrics")
    return "CSV and JSONL rows parse back"


def short_run(s: Setup, batch) -> str:
    steps = 20 if s.quick else 60
    _, model = build.build_model(s.cfg, s.device)
    step, opt = train_step_of(s, model, lr=1e-2 if s.phase1 or s.dpo else 3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        out = step([batch])
        opt.zero_grad(set_to_none=True)
        losses.append((out.stats[0] / out.n_tokens).item())
    # Phase 1's loss has a floor above 0 where a batch holds alike pairs (one caption, two images)
    target = 0.75 if s.phase1 else 0.5
    if not losses[-1] < target * losses[0]:
        raise CheckFailed(f"loss went {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps on one batch, "
                          f"not below {target:g}x", "check learning rates, frozen parameters and labels")
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps on one batch (< {target:g}x)"


def distributed(s: Setup, ds) -> str:
    b = max(1, s.cfg.train.batch_size // 2)
    one = run_train(s, ds, "one-rank", 1, batch_size=2 * b, max_steps=2, grad_accum=1, eval_every=0, save_every=0)
    two = run_train(s, ds, "two-ranks", 2, batch_size=b, max_steps=2, grad_accum=1, eval_every=0, save_every=0,
                    strategy=s.strategy)
    for x, y in zip(one, two):
        if abs(x["loss"] - y["loss"]) > s.rtol * abs(x["loss"]):
            raise CheckFailed(f"step {x['step']}: 2 ranks ({s.strategy}) loss {y['loss']} vs 1 rank {x['loss']}",
                              "check the loss normalisation and the data shards of train.py")
    return f"2 ranks ({s.strategy}) == 1 rank over {len(one)} steps (loss {one[-1]['loss']:.4f}, rtol {s.rtol})"


def resume(s: Setup, ds) -> str:
    const = {"min_lr_ratio": 1.0, "warmup_steps": 0, "eval_every": 0, "save_every": 1, "strategy": s.strategy}
    nproc = 2 if s.strategy == "fsdp" else 1  # FSDP shards over 2 or more ranks
    straight = run_train(s, ds, "straight", nproc, max_steps=3, **const)
    run_train(s, ds, "resumed", nproc, max_steps=2, **const)
    resumed = run_train(s, ds, "resumed", nproc, max_steps=3, **const)
    a, b = straight[-1]["loss"], resumed[-1]["loss"]
    if (a != b) if s.device.type == "cpu" else abs(a - b) > s.rtol * abs(a):
        raise CheckFailed(f"loss after resume {resumed[-1]['loss']} != {straight[-1]['loss']} straight",
                          "check what checkpoint.write_checkpoint stores (RNG, optimizer, data position)")
    same = "identical" if a == b else f"within {s.rtol:g}"
    return f"stop at 2, resume: step 3 loss {same} ({a:.6f}{', 2 ranks, fsdp' if nproc == 2 else ''})"


# ----------------------------------------------------------------------------------------------------------------
# train.py runs on the first samples of the data


def run_train(s: Setup, ds, name: str, nproc: int, **train_keys) -> list[dict]:
    """train.py on the first samples of the data, with `train_keys` set; its training rows."""
    cfg = copy.deepcopy(s.cfg)
    on_gpu = s.device.type == "cuda" and torch.cuda.device_count() >= nproc  # else gloo ranks on the CPU
    cfg.run.out_dir, cfg.run.device, cfg.run.log_every = str(s.scratch / name), "cuda" if on_gpu else "cpu", 1
    cfg.data.val_file, cfg.data.train_file, cfg.data.allow_outside_paths = "", str(subset(s, ds)), True
    cfg.lora.dropout, cfg.data.num_workers, cfg.data.make_demo = 0.0, 0, ""
    for k, v in train_keys.items():
        setattr(cfg.train, k, v)
    try:
        return run_train_py(cfg, nproc)
    except Exception as e:  # a sample's error names the user's file and line, not the subset's
        path = str(subset(s, ds))
        message = re.sub(re.escape(path) + r":(\d+)", lambda m: f"{ds.path}:{ds.examples[int(m.group(1)) - 1].line}",
                         str(e))
        raise CheckFailed(f"{name}: {message.replace(path, str(ds.path))}",
                          "fix or remove that sample, or set data.on_error = \"skip\"; or run train.py by hand "
                          "to see the whole error") from None


def subset(s: Setup, ds, n: int = 64) -> Path:
    """The first n samples of the training data, with media paths made absolute (written once)."""
    path = s.scratch / "subset.jsonl"
    if path.exists():
        return path
    with open(path, "w") as f:
        for ex in ds.examples[:n]:
            if s.phase1:
                sides = {m: str(p) for m, p in ex.files.items()} | ({"text": ex.text} if ex.text else {})
                f.write(json.dumps({"id": ex.id, **sides}) + "\n")
                continue
            media = {m: [str(p) for p in ex.media[m]] for m in MODALITIES}
            turns = {"messages": ex.messages} if not s.dpo else {
                "prompt": ex.messages[:ex.prompt_turns], "chosen": ex.messages[ex.prompt_turns:],
                "rejected": ex.rejected}
            f.write(json.dumps({"id": ex.id, **turns, **media}) + "\n")
    return path


def run_train_py(cfg: Config, nproc: int) -> list[dict]:
    """Train with `cfg`: in this process for one rank, under torchrun for more. Returns the rows of
    metrics.jsonl of the training split; a failed torchrun is a RuntimeError with the end of its errors."""
    if nproc == 1:
        with contextlib.redirect_stdout(io.StringIO()):
            train.fit(cfg)
    else:
        args = [f"--{s}.{k}={v}" for s, sub in dataclasses.asdict(cfg).items() for k, v in sub.items()]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).parent / "train.py"), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            raise RuntimeError(f"train.py exited with {r.returncode}: {r.stderr.strip()[-400:]}")
    rows = [json.loads(x) for x in (Path(cfg.run.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--quick", action="store_true", help="shorter training checks (under a minute on the demo)")
    ap.add_argument("--json", help="also write the results to this file")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        results = [{"check": "Configuration", "passed": False, "seconds": 0.0, "detail": str(e),
                    "fix": "correct the config file or the override"}]
    else:
        results = validate(cfg, args.quick)
    width = max(len(r["check"]) for r in results)
    for r in results:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['check']:<{width}}  {r['seconds']:7.2f}s  {r['detail']}")
        if not r["passed"]:
            print(f"      {'':<{width}}            what to do: {r['fix']}")
    passed = sum(r["passed"] for r in results)
    print(f"{passed}/{len(results)} checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

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
from checkpoint import load_checkpoint, optimizer_state, rng_state, trainable_state, write_checkpoint
from config import Config, check_config, load_config
from metrics import Metrics, group_losses, group_sums, metric_fields, objective
from distributed import World


class CheckFailed(Exception):
    """A check's failure: what went wrong and what to do about it."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


class Validator:
    def __init__(self, cfg: Config, quick: bool):
        # the checks run the layers eager and the step unrecorded: what they check is the model, the data and the
        # loop, and compiling or recording (train.compile, train.cuda_graph: for speed, the latter on GPUs only)
        # would cost each model they build its compilation
        self.cfg, self.quick = copy.deepcopy(cfg), quick
        self.compile, self.cuda_graph = cfg.train.compile, cfg.train.cuda_graph
        self.cfg.train.compile, self.cfg.train.cuda_graph = "none", False
        # the checks in this process hold the whole model; train.strategy = "fsdp" is checked by the runs under
        # torchrun (Distributed, Resume)
        self.strategy, self.cfg.train.strategy = cfg.train.strategy, "ddp"
        gpu = cfg.run.device != "cpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")  # a GPU node checks on its GPU
        self.rtol = 1e-3 if gpu else 1e-5  # bf16 autocast on GPU; fp32 on CPU
        self.scratch = Path(tempfile.mkdtemp(prefix="mmlora-validate-"))
        self.phase1 = cfg.train.phase == "align"  # Phase 1: the aligner on pairs (align.py)
        self.dpo = cfg.train.objective == "dpo"  # preference pairs (dpo.py), from train.init_from's start
        self.results: list[dict] = []

    def run(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if not any(r["check"] == n and r["passed"] for r in self.results)]
        t0 = time.perf_counter()
        if missing:
            result = {"passed": False, "detail": f"not run: needs {', '.join(missing)}",
                      "fix": "fix the checks above first"}
        else:
            try:
                result = {"passed": True, "detail": fn() or ""}
            except CheckFailed as e:
                result = {"passed": False, "detail": e.reason, "fix": e.fix}
            except Exception as e:  # an unexpected error is a failure of this check, with its origin
                where = traceback.extract_tb(e.__traceback__)[-1]
                result = {"passed": False, "detail": f"{type(e).__name__}: {e} ({Path(where.filename).name}:"
                          f"{where.lineno})", "fix": "read the error above; it names the file or key at fault"}
        self.results.append({"check": name, "seconds": round(time.perf_counter() - t0, 2), **result})

    # -- the checks, in order --------------------------------------------------------------------------------

    def configuration(self) -> str:
        check_config(self.cfg)
        for key, path in (("model.llm", self.cfg.model.llm), ("model.aligner", self.cfg.model.aligner),
                          ("data.train_file", self.cfg.data.train_file)):
            if not Path(path).exists() and not self.cfg.data.make_demo:
                raise CheckFailed(f"{key} = {path!r} does not exist", f"set {key} to an existing path")
        if self.cfg.data.make_demo:
            demo.ensure_demo(self.cfg.data.make_demo, phase1=self.cfg.train.phase == "instruct", device=self.device)
        what = "Phase 1 (align)" if self.phase1 else f"{self.cfg.lora.targets} r={self.cfg.lora.rank}"
        return (f"{what}, batch {self.cfg.train.batch_size}, checked eager "
                f"(train.compile = {self.compile!r}, train.cuda_graph = {self.cuda_graph} when training)")

    def model_init(self) -> str:
        self.tokenizer, self.model = build.build_model(self.cfg, self.device)
        print(parameter_report(build.parameter_groups(self.model)))
        return f"{sum(p.numel() for p in self.model.parameters()):,} parameters"

    def freezing(self) -> str:
        groups = build.parameter_groups(self.model)
        if self.phase1:
            return self.freezing_phase1(groups)
        for part in ("aligner", "llm"):
            trainable = [p for p in groups[part] if p.requires_grad]
            if trainable:
                raise CheckFailed(f"{sum(p.numel() for p in trainable):,} parameters of the {part} are trainable",
                                  f"the {part} must be frozen: load it with model.load_aligner / apply_lora")
        if self.dpo and any(p.requires_grad for p in groups["projectors"]):
            raise CheckFailed("the projectors are trainable in DPO", "they are the reference model's too: freeze "
                              "them (build.assemble does with train.objective = \"dpo\")")
        for part in ("lora",) if self.dpo else ("lora", "projectors"):
            if not groups[part] or not all(p.requires_grad for p in groups[part]):
                raise CheckFailed(f"the {part} parameters are not all trainable", "check lora.targets and the model")
        expected = sum(m.rank * (m.base_layer.in_features + m.base_layer.out_features)
                       for m in lora.outer_lora_modules(self.model.llm).values())
        got = sum(p.numel() for p in groups["lora"])
        if got != expected:
            raise CheckFailed(f"LoRA has {got:,} parameters, r*(in+out) gives {expected:,}", "check lora.py")
        return f"LoRA {got:,}, projectors {sum(p.numel() for p in groups['projectors']):,}" + \
            (" (frozen: the reference's too)" if self.dpo else "")

    def freezing_phase1(self, groups: dict) -> str:
        if any(p.requires_grad for p in groups["llm"]):
            raise CheckFailed("the LLM has trainable parameters in Phase 1",
                              "it embeds the text frozen: check align.py")
        heads = [p for m in MODALITIES for p in getattr(self.model.aligner, m).head.parameters()]
        if not all(p.requires_grad for p in heads + groups["text head"]):
            raise CheckFailed("the aligner's heads or the text head are frozen", "check align.AlignModel")
        towers = [p for n, p in self.model.aligner.named_parameters() if ".encoder.tower." in n and p.requires_grad]
        if towers:
            raise CheckFailed("a Hugging Face tower is trainable", "HF towers stay frozen: check align.AlignModel")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return f"{trainable:,} trainable (heads{', encoders' if self.cfg.train.align_encoders else ''}, text head)"

    def data_pipeline(self) -> str:
        c = self.cfg
        K = c.model.tokens_per_media
        try:
            self.ds = train.make_dataset(c, c.data.train_file, self.tokenizer, self.model.aligner)
        except data.SampleError as e:
            raise CheckFailed(str(e), "fix or remove that sample, or set data.on_error = \"skip\"") from None
        n = min(len(self.ds), c.train.batch_size)
        if self.phase1:
            return self.pairs_pipeline(n)
        if self.dpo:
            return self.preferences_pipeline(n)
        self.batch = data.collate([self.ds[i] for i in range(n)], self.tokenizer.pad_id, c.data.pack,
                                  c.data.max_len).to(self.device)
        b = self.batch
        if b.input_ids.shape != b.labels.shape:
            raise CheckFailed("input_ids and labels differ in shape", "check data.collate")
        for i in range(n):  # labels must be exactly the assistant replies and their end-of-turn tokens
            ex = self.ds.examples[i]
            self.check_replies(f"sample {ex.id}", ex.input_ids, ex.labels, ex.messages)
        self.check_media(b, n, K)
        return f"{len(self.ds)} samples, batch {tuple(b.input_ids.shape)}, {len(b.label_index)} labels"

    def check_replies(self, what: str, ids: list[int], labels: list[int], messages: list[dict]) -> None:
        """Labels must be exactly the assistant replies of `messages` and their end-of-turn tokens."""
        targets = [x for t, x in enumerate(labels) if x != -100 and x == ids[t + 1]]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        text = self.tokenizer.decode([x for x in targets if x != self.tokenizer.end_of_turn_id])
        same_text = "".join(text.split()) == "".join("".join(replies).split())
        if len(targets) != sum(x != -100 for x in labels) or not same_text \
                or targets.count(self.tokenizer.end_of_turn_id) < len(replies):
            raise CheckFailed(f"{what}: labels are not exactly its replies ({text!r} vs {replies!r})",
                              "check the chat format (model.chat_format) and data.encode_conversation")

    def check_media(self, b: data.Batch, n: int, K: dict[str, int], copies: int = 1) -> None:
        """The first n samples' media, once per sample, and their placeholders in the batch's rows (in `copies`
        rows per sample: a preference batch's chosen and rejected rows)."""
        for m in MODALITIES:
            placeholders = (b.input_ids == self.model.media_token_ids[m]).flatten().nonzero()[:, 0]
            count = sum(sum(ex.blocks[m]) if m in ex.blocks else len(ex.media[m])  # a long clip's windows
                        for ex in self.ds.examples[:n])
            if len(placeholders) != copies * count * K[m]:
                raise CheckFailed(f"{len(placeholders)} {m} placeholder tokens for {count} {m} inputs of {K[m]}"
                                  + (f" in {copies} rows each" if copies > 1 else ""),
                                  "check the placeholders of the data")
            if m in b.media and len(b.media[m]) != count:
                raise CheckFailed(f"the batch holds {len(b.media[m])} {m} inputs for {count}: each sample's media "
                                  "count once", "check data.collate_preferences")
            if not torch.equal(b.media[m].slots if m in b.media else placeholders[:0], placeholders):
                raise CheckFailed(f"the collator's {m} slots are not the placeholder positions", "check data.collate")

    def preferences_pipeline(self, n: int) -> str:
        """Preference pairs: both answers labelled exactly, after one prompt that both rows share, and the
        prompt's media counted once."""
        self.batch = b = data.collate_preferences([self.ds[i] for i in range(n)], self.tokenizer.pad_id,
                                                  self.cfg.data.pad_multiple).to(self.device)
        for i in range(n):
            ex = self.ds.examples[i]
            prompt = ex.messages[:ex.prompt_turns]
            for name, ids, labels, answer in (("chosen", ex.input_ids, ex.labels, ex.messages[ex.prompt_turns:]),
                                              ("rejected", ex.rejected_ids, ex.rejected_labels, ex.rejected)):
                self.check_replies(f"sample {ex.id} ({name})", ids, labels, answer)
            first = [next(t for t, x in enumerate(labels) if x != -100) for labels in (ex.labels, ex.rejected_labels)]
            if first[0] != first[1] or ex.input_ids[:first[0] + 1] != ex.rejected_ids[:first[0] + 1]:
                raise CheckFailed(f"sample {ex.id}: its chosen and rejected rows do not start with the same prompt "
                                  f"({len(prompt)} turns)", "check data.PreferenceDataset and the chat format")
        self.check_media(b.rows, n, self.cfg.model.tokens_per_media, copies=2)
        return (f"{len(self.ds)} preference pairs, batch {tuple(b.rows.input_ids.shape)} (chosen and rejected rows), "
                f"{len(b.rows.label_index)} labels")

    def pairs_pipeline(self, n: int) -> str:
        items = [self.ds[i] for i in range(n)]
        self.batch = b = data.collate_pairs(items, self.tokenizer.pad_id).to(self.device)
        stack = [(m, i) for m in ("image", "audio", "text") for i, it in enumerate(items)
                 if (it.text_ids is not None if m == "text" else m in it.media)]
        for i, it in enumerate(items):
            a, c = data.PAIR_KINDS[it.kind]
            if stack[b.left[i]] != (a, i) or stack[b.right[i]] != (c, i):
                raise CheckFailed(f"pair {it.id}: its sides do not index its own media", "check data.collate_pairs")
        kinds = ", ".join(f"{int((b.kind == k).sum())} {a}-{c}" for k, (a, c) in enumerate(data.PAIR_KINDS))
        return f"{len(self.ds)} pairs; a batch of {n}: {kinds}"

    def forward(self) -> str:
        if self.dpo:
            return self.preference_forward()
        with torch.no_grad():
            out = self.model(self.batch)
        loss = (out.loss_sum / out.n_tokens).item()
        if not torch.isfinite(torch.tensor(loss)):
            raise CheckFailed(f"loss is {loss}", "check the model's weights and the data")
        per = group_losses(group_sums(out, self.batch.groups()), self.cfg.train.phase)
        return f"loss {loss:.4f}; " + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if v is not None)

    def preference_forward(self) -> str:
        """DPO at its start: the policy is its reference (the new adapters change nothing yet), so the loss is
        ln 2 and every reward 0."""
        with torch.no_grad():
            policy, reference, tokens = dpo.logps(self.model, self.model, self.batch)
            _, _, stats = dpo.pair_terms(policy, reference, tokens, self.batch.groups(), self.cfg.train)
        loss, margin = (stats[0] / self.batch.pairs).item(), float((policy - reference).abs().max())
        if not torch.isfinite(stats).all() or margin > 1e-3 * max(1.0, float(reference.abs().max())):
            raise CheckFailed(f"the policy is not its reference at the start (loss {loss}, log-ratios up to "
                              f"{margin:.2e})", "the run's new LoRA adapters must start at B = 0, and "
                              "lora.disable_adapters must turn off only them")
        return f"DPO loss {loss:.4f} at the start (ln 2 = 0.6931: the policy is its reference)"

    def training_step(self) -> str:
        model = self.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step, opt = self.step(model)
        model.train()
        step([self.batch])
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

    def step(self, model, lr: float | None = None):
        """train.py's step for `model` on this process (learning rates from the config, or both `lr`), and its
        optimizer."""
        cfg = copy.deepcopy(self.cfg)
        if lr is not None:
            cfg.train.lr_projector = cfg.train.lr_lora = cfg.train.lr_aligner = lr
        opt, params = train.make_optimizer(model, cfg.train)
        scaler, autocast = train.mixed_precision(cfg.train, self.device)
        return train.make_step(model, opt, scaler, params, autocast, World(device=self.device), cfg), opt

    def checkpoint(self) -> str:
        folder = Path(self.cfg.run.out_dir) / "validate-checkpoints"
        _, opt = self.step(self.model)
        scaler, _ = train.mixed_precision(self.cfg.train, self.device)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = write_checkpoint(folder, "step_0000001", trainable_state(self.model),
                                    optimizer_state(self.model, opt), scaler,
                                    {"step": 1, "consumed": 0, "best": 0.0, "bad_steps": 0}, [rng_state()])
        except OSError as e:
            raise CheckFailed(f"cannot write a checkpoint in {folder}: {e}",
                              "make run.out_dir a writable folder with free space") from None
        _, fresh = build.build_model(self.cfg, self.device)
        _, opt2 = self.step(fresh)
        load_checkpoint(path, fresh, opt2, scaler, World())
        a, b = trainable_state(self.model), trainable_state(fresh)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            raise CheckFailed("reloaded tensors differ from the saved ones", "check checkpoint.write_checkpoint")
        self.model.eval(), fresh.eval()
        rows = self.batch.rows if self.dpo else self.batch  # (a preference batch's rows, as SFT rows)
        with torch.no_grad():
            la, lb = self.model(rows).loss_sum, fresh(rows).loss_sum
        if not torch.equal(la, lb):
            raise CheckFailed(f"next loss {la.item()} != {lb.item()} after reload", "check checkpoint.load_checkpoint")
        return f"{path.name}: identical tensors and next loss"

    def metrics(self) -> str:
        folder = self.scratch / "metrics"
        folder.mkdir()
        m = Metrics(folder, True, metric_fields(objective(self.cfg)))
        m.log({"step": 1, "split": "train", "loss": 1.5, "lr": 1e-4})
        m.log({"step": 1, "split": "val", "loss": 1.4, "accuracy": 0.5})
        rows = list(csv.DictReader(open(folder / "metrics.csv")))
        jl = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        if len(rows) != 2 or float(rows[1]["loss"]) != 1.4 or jl[0]["lr"] != 1e-4:
            raise CheckFailed("metrics rows are not read back as written", "check metrics.Metrics")
        return "CSV and JSONL rows parse back"

    def short_run(self) -> str:
        steps = 20 if self.quick else 60
        _, model = build.build_model(self.cfg, self.device)
        step, opt = self.step(model, lr=1e-2 if self.phase1 or self.dpo else 3e-3)
        model.train()
        losses = []
        for _ in range(steps):
            out = step([self.batch])
            opt.zero_grad(set_to_none=True)
            losses.append((out.stats[0] / out.n_tokens).item())
        # Phase 1's loss has a floor above 0 where a batch holds alike pairs (one caption, two images)
        target = 0.75 if self.phase1 else 0.5
        if not losses[-1] < target * losses[0]:
            raise CheckFailed(f"loss went {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps on one batch, "
                              f"not below {target:g}x", "check learning rates, frozen parameters and labels")
        return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps on one batch (< {target:g}x)"

    def run_train(self, name: str, nproc: int, **train_keys) -> list[dict]:
        """train.py on the first samples of the data, with `train_keys` set; its training rows."""
        cfg = copy.deepcopy(self.cfg)
        on_gpu = self.device.type == "cuda" and torch.cuda.device_count() >= nproc  # else gloo ranks on the CPU
        cfg.run.out_dir, cfg.run.device, cfg.run.log_every = str(self.scratch / name), "cuda" if on_gpu else "cpu", 1
        cfg.data.val_file, cfg.data.train_file, cfg.data.allow_outside_paths = "", str(self.subset()), True
        cfg.lora.dropout, cfg.data.num_workers, cfg.data.make_demo = 0.0, 0, ""
        for k, v in train_keys.items():
            setattr(cfg.train, k, v)
        try:
            return run_train_py(cfg, nproc)
        except Exception as e:  # a sample's error names the user's file and line, not the subset's
            subset = str(self.subset())
            message = re.sub(re.escape(subset) + r":(\d+)",
                             lambda m: f"{self.ds.path}:{self.ds.examples[int(m.group(1)) - 1].line}", str(e))
            raise CheckFailed(f"{name}: {message.replace(subset, str(self.ds.path))}",
                              "fix or remove that sample, or set data.on_error = \"skip\"; or run train.py by hand "
                              "to see the whole error") from None

    def subset(self, n: int = 64) -> Path:
        """The first n samples of the training data, with media paths made absolute."""
        path = self.scratch / "subset.jsonl"
        if not path.exists() and self.phase1:
            with open(path, "w") as f:
                for ex in self.ds.examples[:n]:
                    sides = {m: str(p) for m, p in ex.files.items()} | ({"text": ex.text} if ex.text else {})
                    f.write(json.dumps({"id": ex.id, **sides}) + "\n")
        if not path.exists():
            with open(path, "w") as f:
                for ex in self.ds.examples[:n]:
                    media = {m: [str(p) for p in ex.media[m]] for m in MODALITIES}
                    turns = {"messages": ex.messages} if not self.dpo else {
                        "prompt": ex.messages[:ex.prompt_turns], "chosen": ex.messages[ex.prompt_turns:],
                        "rejected": ex.rejected}
                    f.write(json.dumps({"id": ex.id, **turns, **media}) + "\n")
        return path

    def distributed(self) -> str:
        b = max(1, self.cfg.train.batch_size // 2)
        one = self.run_train("one-rank", 1, batch_size=2 * b, max_steps=2, grad_accum=1, eval_every=0, save_every=0)
        two = self.run_train("two-ranks", 2, batch_size=b, max_steps=2, grad_accum=1, eval_every=0, save_every=0,
                             strategy=self.strategy)
        for x, y in zip(one, two):
            if abs(x["loss"] - y["loss"]) > self.rtol * abs(x["loss"]):
                raise CheckFailed(f"step {x['step']}: 2 ranks ({self.strategy}) loss {y['loss']} vs 1 rank "
                                  f"{x['loss']}", "check the loss normalisation and the data shards of train.py")
        return (f"2 ranks ({self.strategy}) == 1 rank over {len(one)} steps (loss {one[-1]['loss']:.4f}, "
                f"rtol {self.rtol})")

    def resume(self) -> str:
        const = {"min_lr_ratio": 1.0, "warmup_steps": 0, "eval_every": 0, "save_every": 1, "strategy": self.strategy}
        nproc = 2 if self.strategy == "fsdp" else 1  # FSDP shards over 2 or more ranks
        straight = self.run_train("straight", nproc, max_steps=3, **const)
        self.run_train("resumed", nproc, max_steps=2, **const)
        resumed = self.run_train("resumed", nproc, max_steps=3, **const)
        a, b = straight[-1]["loss"], resumed[-1]["loss"]
        if (a != b) if self.device.type == "cpu" else abs(a - b) > self.rtol * abs(a):
            raise CheckFailed(f"loss after resume {resumed[-1]['loss']} != {straight[-1]['loss']} straight",
                              "check what checkpoint.write_checkpoint stores (RNG, optimizer, data position)")
        same = "identical" if a == b else f"within {self.rtol:g}"
        return f"stop at 2, resume: step 3 loss {same} ({a:.6f}{', 2 ranks, fsdp' if nproc == 2 else ''})"


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


CHECKS = [("Configuration", "configuration", ()), ("Model initialization", "model_init", ("Configuration",)),
          ("Parameter freezing", "freezing", ("Model initialization",)),
          ("Data pipeline", "data_pipeline", ("Model initialization",)),
          ("Forward pass", "forward", ("Data pipeline",)), ("Training step", "training_step", ("Forward pass",)),
          ("Checkpoint saving", "checkpoint", ("Data pipeline",)), ("Metrics logging", "metrics", ()),
          ("Short training run", "short_run", ("Data pipeline",)),
          ("Distributed", "distributed", ("Data pipeline",)), ("Resume", "resume", ("Data pipeline",))]


def validate(cfg: Config, quick: bool = False) -> list[dict]:
    v = Validator(cfg, quick)
    torch.manual_seed(cfg.train.seed)
    try:
        for name, method, needs in CHECKS:
            v.run(name, getattr(v, method), needs)
    finally:
        shutil.rmtree(v.scratch, ignore_errors=True)
    return v.results


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

"""The run folder on disk: its lock, checkpoints (written atomically, found, read whole, restored after checking
that they fit; `resume_or_start` picks where a run starts), train.init_from's start (`read_start`) and the export
folder that transformers, peft and mmlora load.

    <out_dir>/run.lock                      held by the running process (fcntl: the system drops it at exit)
    <out_dir>/checkpoints/step_0000100/     trainable.safetensors, optimizer.pt, rng.pt, state.json
    <out_dir>/checkpoints/latest            names the newest; best/ and emergency/ beside the steps
    <out_dir>/export/                       adapter/ (peft), merged/ (transformers), projectors, aligner, mmlora.json

Every folder is written under a temporary name, fsynced and renamed into place (`write_folder`), so that a crash at
any moment leaves the previous folder or the new one whole, never a mix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError

import lora
from config import Config
from distributed import World, shard_of, whole
from weights import check_tensors, save_tensors, weights_hash, write_json
from model import save_llm
from encoders import copy_aligner
from multimodal import MultimodalLM
from quant import NF4Linear


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


def trainable_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the trainable tensors (projectors + LoRA), by their names in the model, whole
    (under FSDP each is gathered from its shards: every rank must call this)."""
    return {n: whole(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


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
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors report a full disk so
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write {final}: {e}. {advice}") from None
    except BaseException:  # Ctrl-C in an export, say: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError as e:  # a mount point or a folder in use cannot be renamed: the old one is put back
        if old.exists() and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot put {final} in place ({e}). {advice}") from None
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


# what a writer leaves while it works: `write_folder`'s temporary and set-aside folders, `save_tensors`' and
# `write_json`'s temporary files, the next `latest`; each named with the writer's PID
LEFTOVER = re.compile(r"\.(?:tmp-.*|old-.*|.+\.tmp|latest)-(\d+)")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: the check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(folder: Path, log, name: str | None = None) -> None:
    """Remove what a writer that died (its PID gone: a kill -9, a crash) left half-written in `folder` (of the
    folder `name` only, if given), saying so through `log`. A folder it had set aside while swapping in the new one
    is put back where the new one never arrived."""
    if not folder.is_dir():
        return
    for p in sorted(folder.glob(".*")):
        m = LEFTOVER.fullmatch(p.name)
        if m is None or (name is not None and not p.name.startswith((f".tmp-{name}-", f".old-{name}-"))) \
                or pid_alive(int(m[1])):
            continue
        kept = folder / p.name.removeprefix(".old-").removesuffix(f"-{m[1]}")
        if p.name.startswith(".old-") and not kept.exists():
            p.rename(kept)
            log(f"put back {kept}, which a stopped process (pid {m[1]}) had set aside as {p.name}")
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        log(f"removed {p}, left half-written by a stopped process (pid {m[1]})")


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
    saved_quantize = state.get("config", {}).get("model", {}).get("quantize")
    nf4 = any(isinstance(m, NF4Linear) for m in model.llm.modules())
    if saved_quantize is not None and (saved_quantize == "nf4") != nf4:
        bases = {True: "an NF4 (4-bit, QLoRA) base, model.quantize = \"nf4\"",
                 False: "an unquantized base, model.quantize = \"none\""}
        raise ValueError(f"{path}: checkpoint was trained on {bases[saved_quantize == 'nf4']}, and this run loads "
                         f"{bases[nf4]}: its adapters learned the other base's weights; use model.quantize = "
                         f"\"{saved_quantize}\" as it was trained, or {instead}")
    start_hash = state.get("start_hash")
    if start_hash is not None:  # a run from train.init_from: its adapters were trained on top of that start
        init = state["config"]["train"]["init_from"]
        now = read_start(init).hash
        if now != start_hash:
            raise ValueError(f"{path}: its run began from other weights than train.init_from = {init} holds now (hash "
                             f"{start_hash}, now {now}): its adapters were trained on top of those; put that start "
                             f"back, or {instead}")
    alphas = {m.alpha for m in lora.outer_lora_modules(model.llm).values()}
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


def load_checkpoint(path: Path, model: MultimodalLM, opt, scaler, world: World, seed: int) -> TrainState:
    """Restore trainable tensors, optimizer state, scaler and this rank's RNGs; check that the checkpoint fits this
    run first. The optimizer's hyperparameters stay this run's (the schedule sets the learning rate). A rank the
    checkpoint holds no RNG state for (it ran on fewer ranks, or rank 0 saved alone after a crash) is seeded from
    `seed`, its rank and the step, so that dropout still differs across ranks."""
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
    if world.rank < len(rngs) and rngs[world.rank] is not None:
        set_rng_state(rngs[world.rank])
    else:
        torch.manual_seed(seed + world.rank + world.size * (state["step"] + 1))
    return TrainState(state["step"], state["consumed"], state["best"], state["bad_steps"])


def resume_or_start(cfg: Config, model: MultimodalLM, opt, scaler, world: World, log) -> TrainState:
    """Where the run starts: restored from the first of `resume_candidates` that reads (with train.resume = "auto"
    one that cannot be read gives way to the next, older one), else a fresh start with this rank's seed (dropout
    differs across ranks, the same on every run)."""
    candidates = resume_candidates(cfg)
    for path in candidates:
        try:
            run = load_checkpoint(path, model, opt, scaler, world, cfg.train.seed)
        except CheckpointReadError as e:
            if cfg.train.resume != "auto" or path == candidates[-1]:  # none left to fall back on
                raise
            log(f"skipping a checkpoint that cannot be read: {e}")
            continue
        log(f"resumed from {path} at step {run.step} (global sample {run.consumed})")
        return run
    torch.manual_seed(cfg.train.seed + world.rank)
    return TrainState()


class RunFolderError(RuntimeError):
    """run.out_dir cannot take this run: another run holds it, or it holds an earlier run's checkpoints and the
    run would start afresh over them."""


def check_fresh_start(cfg: Config) -> None:
    """A RunFolderError if train.resume = "none" would write a new run over the checkpoints of one in out_dir."""
    ckpt_dir = Path(cfg.run.out_dir) / "checkpoints"
    found = checkpoints_in(ckpt_dir) if cfg.train.resume == "none" else []
    if found:
        raise RunFolderError(f"{cfg.run.out_dir} holds the checkpoints of an earlier run (up to step "
                             f"{max(map(checkpoint_step, found))}, in {ckpt_dir}), which train.resume = \"none\" would "
                             "write over: give a new run.out_dir, or continue that run with train.resume = \"auto\"")


@dataclass
class Start:
    """What a run starts from (train.init_from): a Phase-2 run's LoRA adapter and projectors, read from one of its
    checkpoints or from its export folder."""
    folder: Path  # the checkpoint or export folder read
    adapter: dict[str, torch.Tensor]  # LoRA tensors under the LLM's names (model.layers.0.self_attn.q_proj.lora_A...)
    alpha: float  # its lora_alpha: its update is (alpha / rank) B @ A
    projectors: dict[str, torch.Tensor]  # under the projectors' names (image.linear_1.weight)
    hash: str  # of the adapter and projectors: a resumed run checks that its start is the one it began from

    @property
    def rank(self) -> int:
        return next(v.shape[0] for k, v in self.adapter.items() if k.endswith(".lora_A.weight"))

    @property
    def targets(self) -> list[str]:
        """The short names of the layers the adapter wraps (q_proj, ...)."""
        return sorted({k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for k in self.adapter
                       if k.endswith(".lora_A.weight")})

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return lora.adapter_factors(self.adapter, self.alpha / self.rank)


START_HINT = "give train.init_from a Phase-2 run folder, one of its checkpoints/step_* folders or its export folder"


def start_folder(path: str | Path) -> Path:
    """The folder that train.init_from = `path` reads, by its marker files, nothing loaded (a run checks it before
    it builds anything): an export folder, a checkpoint folder, or a run folder's best checkpoint, else its latest.
    A FileNotFoundError where there is none."""
    folder = Path(path)
    if (folder / "mmlora.json").is_file():
        return folder
    if (folder / "config.json").is_file() and not (folder / "state.json").is_file():  # a run folder
        ckpt = folder / "checkpoints"
        best = ckpt / "best"
        folder = best if (best / "state.json").is_file() else next(iter(checkpoints_in(ckpt)), folder)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"train.init_from = {path}: no export (mmlora.json), run (config.json with a "
                                f"checkpoint) or checkpoint (state.json) there; {START_HINT}")
    return folder


def read_start(path: str | Path) -> Start:
    """train.init_from: an export folder (its adapter/ and projectors), a checkpoint folder, or a run folder (its best
    checkpoint, else its latest). A Phase-1 run, or a checkpoint of a run that itself started from another (it holds
    only its own adapters), is a ValueError saying what to give instead."""
    from safetensors.torch import load_file

    folder = start_folder(path)
    if (folder / "mmlora.json").is_file():
        doc = json.loads((folder / "mmlora.json").read_text())
        adapter_config, adapter = lora.read_adapter(folder / "adapter")
        projectors, alpha = load_file(str(folder / doc["projectors"])), adapter_config["lora_alpha"]
    else:
        state, tensors = read_checkpoint(folder, "trainable.safetensors", hint=START_HINT[0].upper() + START_HINT[1:])
        config = state.get("config", {})
        if config.get("train", {}).get("phase") == "align":
            raise ValueError(f"train.init_from = {path} is a Phase-1 run (its aligner is for model.aligner); "
                             f"{START_HINT}")
        if config.get("train", {}).get("init_from"):
            raise ValueError(f"train.init_from = {path} is a checkpoint of a run that started from another "
                             f"({config['train']['init_from']}), and holds only its own adapters: give its export "
                             "folder, whose adapter holds both runs' updates")
        adapter = {k.removeprefix("llm."): v for k, v in tensors.items() if k.startswith("llm.")}
        projectors = {k.removeprefix("projectors."): v for k, v in tensors.items() if k.startswith("projectors.")}
        alpha = config["lora"]["alpha"]
    if not any(k.endswith(".lora_A.weight") for k in adapter):
        raise ValueError(f"train.init_from = {path}: no LoRA adapter in {folder}; {START_HINT}")
    tensors = {**{f"llm.{k}": v for k, v in adapter.items()}, **{f"projectors.{k}": v for k, v in projectors.items()}}
    return Start(folder, adapter, float(alpha), projectors, weights_hash(tensors))


class RunLock:
    """An exclusive lock on a run's folder, so that two runs never share it: `fcntl.flock` on `<out_dir>/run.lock`,
    which names the holder's host and PID. The system drops the lock when the process ends, so a crashed run
    leaves none behind. `probe`: only check that no run holds it (a RunFolderError if one does), and let go."""

    def __init__(self, out_dir: Path, probe: bool = False):
        import fcntl
        import socket

        self.file = open(out_dir / "run.lock", "r" if probe else "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunFolderError(f"{out_dir} is in use by another run ({holder}); wait for it to end, or give this "
                                 "run another run.out_dir") from None
        if probe:
            self.release()
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def check_export_folder(folder: Path) -> None:
    """A ValueError unless `folder` may take an export: new, empty, or an export folder (which is replaced); not the
    current folder (nor one holding it), which a rename cannot replace, and not inside an export or a checkpoint."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file; give a folder for the export")
    where = folder.resolve()
    if where == Path.cwd() or where in Path.cwd().parents:
        raise ValueError(f"{folder}: is the current folder (or holds it), which the export would replace whole; give "
                         f"a new folder, for example {folder / 'export'}")
    inside = next((p for p in where.parents if (p / "mmlora.json").is_file() or (p / "state.json").is_file()), None)
    if inside is not None:
        raise ValueError(f"{folder}: lies inside the export or checkpoint folder {inside}, whose files are loaded "
                         "as a whole; give a folder outside it")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "mmlora.json").is_file():
        raise ValueError(f"{folder}: holds files and is not an export folder (no mmlora.json); give a new or empty "
                         "folder, so that nothing there is overwritten")


def export(model: MultimodalLM, folder: Path, cfg: Config, dtype: torch.dtype | None = None, log=print) -> None:
    """The run's result as one folder that transformers, peft and mmlora load:

    adapter/                 peft's format; base_model_name_or_path is the base's absolute path (a run from
                             train.init_from: its start's adapter and its own, as one adapter of both ranks)
    merged/                  the LLM with LoRA folded in (a start's too), a Hugging Face folder (sharded at 5 GB,
                             with its tokenizer and generation config): AutoModelForCausalLM.from_pretrained loads it
    projectors.safetensors   the trained projectors
    aligner/                 a copy of the frozen aligner, read from its folder (model.aligner)
    mmlora.json              the run's config, for `generate.load_run(folder)`

    The model itself is not changed (the merge is computed aside), `dtype` casts the merged weights. The folder is
    written beside `folder` under a temporary name, then takes its place (`write_folder`): an export folder already
    there is replaced whole, never mixed with the new one. A file, or a folder that holds anything but an export,
    is refused (ValueError) before anything is written. What an earlier export killed midway left beside `folder`
    is removed first, said through `log`. Files are readable by all."""
    check_export_folder(folder)
    remove_leftovers(folder.parent, log, name=folder.name)
    base = Path(cfg.model.llm).resolve()
    # a run from train.init_from trained its adapters on top of that start's: adapter/ holds both, for the base
    prior = read_start(cfg.train.init_from).factors() if cfg.train.init_from else None

    def write(tmp: Path) -> None:
        lora.save_adapter(model.llm, tmp / "adapter", str(base), prior)
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

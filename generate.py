"""Use what you trained: one question, a chat, predictions over a dataset with metrics, and the export folder.

    python generate.py --run runs/demo --image media/a.png "What colour is the shape?"    # the answer, streamed
    python generate.py --run runs/demo --chat                      # multi-turn; /image P, /audio P, /reset, /exit
    python generate.py --run runs/demo --predict data/val.jsonl --out pred.jsonl        # + pred.metrics.json
    python generate.py --run runs/demo --export out/ [--dtype bfloat16]                 # adapter/, merged/, ...

    model, tokenizer, cfg = load_run("runs/demo")                  # the same from Python

`--run` is a run folder (its config.json and a checkpoint: `--checkpoint best`, `latest` or a path) or an export
folder (its mmlora.json: the merged LLM, projectors and aligner, nothing else needed). Media given with `--image` /
`--audio` are attached to the question; `<image>` / `<audio>` in the text place them, else they go first. Bad input
(no checkpoint, one that does not fit, a missing or undecodable medium, more media than placeholders, a prompt
longer than the context, an option out of range, an --out that is a file read or lies in a run's or an export's
folder, a disk that cannot take the output) is one line saying what to fix, and exit code 2. `--out` may replace
only an earlier predictions file, and may be a stream (`--out /dev/stdout | ...`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import build
import data
import media
from weights import check_tensors, read_json, read_safetensors, write_json
from tokenizer import Tokenizer, load_tokenizer
from encoders import aligner_config
from multimodal import MODALITIES, MultimodalLM
from model import LLMConfig
from decode import choose_decoder
from checkpoint import (CheckpointWriteError, check_export_folder, checkpoints_in, export, read_checkpoint,
                        restore_trainable)
from config import Config, config_from_dict


# ----------------------------------------------------------------------------------------------------------------
# Loading a run or an export folder


CHECKPOINT_HINT = "Give --checkpoint another of the run's checkpoints (a checkpoints/step_* folder, or latest)"
EXPORT_HINT = "export it again with `python generate.py --run RUN_DIR --export DIR`"


def load_run(folder: str | Path, checkpoint: str = "best", device: str | None = None, dtype: str | None = None,
             tokenizer: Tokenizer | None = None) -> tuple[MultimodalLM, Tokenizer, Config]:
    """The trained model (eval mode), its tokenizer and the run's config, from a run folder (`checkpoint`: "best",
    falling back to the latest where no validation ran; "latest"; or a checkpoint folder) or an export folder.
    `device` defaults to the GPU when there is one, `dtype` ("bfloat16", "float32") to bf16 there, fp32 on a CPU.
    A file that cannot be read (cut short, not JSON, keys missing) is a ValueError naming it and what to do.
    `tokenizer`: the run's, where the caller has loaded it already."""
    folder, cfg = Path(folder), run_config(folder, device, dtype)
    manifest = folder / "mmlora.json"
    target = torch.device("cuda" if uses_cuda(cfg) else "cpu")
    if manifest.is_file():
        doc = read_json(manifest, "")
        try:
            tokenizer, model = build.build_model(cfg, target, adapters=False, tokenizer=tokenizer)
            tensors = read_safetensors(folder / doc["projectors"])
        except ValueError as e:
            raise ValueError(f"{e}. In an export folder: {EXPORT_HINT}") from None
        expected = model.projectors.state_dict()
        check_tensors({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in tensors.items()},
                      f"{folder / doc['projectors']}: the projectors do not fit the export's config")
        model.projectors.load_state_dict(tensors)
    else:
        path = checkpoint_folder(folder, checkpoint)
        tokenizer, model = build.build_model(cfg, target, tokenizer=tokenizer)
        state, tensors = read_checkpoint(path, "trainable.safetensors", hint=CHECKPOINT_HINT)
        restore_trainable(path, state, tensors, model, instead="--checkpoint PATH of a checkpoint of this run")
    return model.eval(), tokenizer, cfg


def uses_cuda(cfg: Config) -> bool:
    return cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())


def run_config(folder: str | Path, device: str | None = None, dtype: str | None = None) -> Config:
    """The config that `load_run` builds the model of: the run's, or the export's with its folder's paths, set for
    generation on `device` in `dtype`."""
    folder = Path(folder)
    manifest = folder / "mmlora.json"
    if manifest.is_file():
        doc = read_json(manifest, "")
        missing = [k for k in ("config", "llm", "aligner", "projectors") if k not in doc]
        if missing:
            raise ValueError(f"{manifest}: not an export's mmlora.json (it lacks {missing}); {EXPORT_HINT}")
        cfg = config_from_dict(doc["config"], str(manifest))
        cfg.model.llm, cfg.model.aligner = str(folder / doc["llm"]), str(folder / doc["aligner"])
        # merged/ holds the trained model's weights (a QLoRA run's merged against its dequantized base), read as
        # they are: quantizing them again would blur the adapters' update. A run folder keeps its 4-bit base.
        cfg.model.quantize = "none"
        cfg.train.init_from = ""  # merged/ holds a start's update too (train.init_from), and projectors its own
    elif (folder / "config.json").is_file():
        cfg = config_from_dict(read_json(folder / "config.json", ""), str(folder / "config.json"))
    else:
        raise FileNotFoundError(f"{folder}: neither a run folder (config.json) nor an export folder (mmlora.json); "
                                "give the run.out_dir of a training run or a folder written by --export")
    if cfg.train.phase == "align":
        raise ValueError(f"{folder} is a Phase-1 run (train.phase = \"align\"): it made the aligner in "
                         f"{folder / 'aligner'}, for Phase 2's model.aligner; give a Phase-2 run or export here")
    cfg.run.device = device or cfg.run.device
    cfg.model.dtype = dtype or "auto"
    cfg.train.compile, cfg.train.cuda_graph, cfg.train.activation_checkpointing = "none", False, False
    cfg.train.offload_activations = False
    cfg.train.strategy = "ddp"  # a run trained sharded (fsdp) is used whole, on one device
    return cfg


def checkpoint_folder(run: Path, checkpoint: str) -> Path:
    ckpt = run / "checkpoints"
    if checkpoint not in ("best", "latest"):
        path = Path(checkpoint)
    elif checkpoint == "best" and (ckpt / "best" / "state.json").is_file():
        path = ckpt / "best"
    else:
        path = next(iter(checkpoints_in(ckpt)), None)
    if path is None or not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path or ckpt}: no checkpoint there; train first, or give --checkpoint PATH "
                                "(a checkpoints/step_* folder)")
    return path


def input_files(run: Path, checkpoint: str) -> set[Path]:
    """The files `load_run(run, checkpoint)` reads from the run or export folder, resolved: what an output path
    must never name."""
    if (run / "mmlora.json").is_file():
        parts = [run / p for p in ("mmlora.json", "merged", "adapter", "aligner", "projectors.safetensors")]
        return {f.resolve() for p in parts for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()}
    found = {(run / "config.json").resolve()}
    with contextlib.suppress(FileNotFoundError):
        found |= {f.resolve() for f in checkpoint_folder(run, checkpoint).iterdir()}
    return found


# ----------------------------------------------------------------------------------------------------------------
# Prompts: a conversation and its media -> an item for data.collate


def user_turn(text: str, media: list[tuple[str, str]]) -> str:
    """The user's text with a placeholder for each attached medium that the text does not place itself."""
    for m in MODALITIES:
        count, given = sum(1 for kind, _ in media if kind == m), text.count(data.PLACEHOLDERS[m])
        if given == 0:
            text = f"{data.PLACEHOLDERS[m]}\n" * count + text
        elif given != count:
            raise ValueError(f"the text places {given} {data.PLACEHOLDERS[m]} but {count} {m} file(s) are attached")
    return text


def decode_medium(kind: str, path: str | Path, model: MultimodalLM, cfg: Config) -> torch.Tensor:
    """One attached medium, decoded as the aligner takes it: an image (1, 3, S, S), a clip's windows (W, n). A
    missing file is a FileNotFoundError, one that does not decode or is too long a ValueError, each naming it."""
    c, f = model.aligner.config, Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: {kind} file not found")
    if kind == "image":
        return media.preprocess_image(media.load_image(f), c)[None]
    x = media.preprocess_audio(media.load_audio(f, c.sample_rate), c)
    if len(x) > cfg.data.max_audio_windows:
        raise ValueError(f"{f} fills {len(x)} windows of {c.clip_seconds:g} s, more than "
                         f"data.max_audio_windows = {cfg.data.max_audio_windows}; cut the clip")
    return x


def prompt_item(messages: list[dict], media: list[tuple[str, str]], tokenizer: Tokenizer, model: MultimodalLM,
                cfg: Config, max_new_tokens: int) -> data.Item:
    """The conversation so far, ending with the generation prompt, with its media decoded in placeholder order."""
    raw = {m: [decode_medium(m, p, model, cfg) for kind, p in media if kind == m] for m in MODALITIES}
    item = encode_prompt(messages, raw, tokenizer, model, cfg)
    context = model.llm.config.max_position_embeddings
    if len(item.input_ids) + max_new_tokens > context:
        raise ValueError(f"the prompt is {len(item.input_ids)} tokens and {max_new_tokens} new ones are asked for, "
                         f"more than the model's context of {context}; shorten the question or lower --max_new_tokens")
    return item


def encode_prompt(messages: list[dict], raw: dict[str, list[torch.Tensor]], tokenizer: Tokenizer,
                  model: MultimodalLM, cfg: Config) -> data.Item:
    """The conversation ending with the generation prompt, as an item for data.collate, with its decoded media
    (`raw`: modality -> the media in placeholder order, as `decode_medium` gives them) attached."""
    ids, _, counts = data.encode_conversation(messages, tokenizer, cfg.model.tokens_per_media, 10**9, False,
                                              add_generation_prompt=True,
                                              blocks={m: [len(x) for x in raw[m]] for m in MODALITIES})
    item = data.Item("prompt", ids, [-100] * len(ids))
    for m in MODALITIES:
        if raw[m]:
            slots = torch.tensor([t for t, x in enumerate(ids) if x == model.media_token_ids[m]])
            item.media[m] = data.Media(slots, raw=torch.cat(raw[m]))
    return item


def half_precision(model: MultimodalLM):
    """The context generation runs in: on a GPU with a bf16 LLM, bf16 autocast, so that the aligner and the
    projectors (kept in fp32) run their matmuls in bf16 as in training; autocast's cache of cast weights off, since
    the decode steps may be recorded as CUDA graphs. Elsewhere, nothing."""
    w = model.llm.lm_head.weight
    if w.is_cuda and w.dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def answer(model: MultimodalLM, tokenizer: Tokenizer, item: data.Item, max_new_tokens: int, sampling: dict,
           stream=None) -> str:
    """Generate the reply to one prompt; `stream` receives the text as it grows, piece by piece."""
    device = model.llm.lm_head.weight.device
    batch = data.collate([item], tokenizer.pad_id).to(device)
    tokens: list[int] = []
    shown, stopped = "", False

    def on_token(new: list[int]) -> None:
        nonlocal shown, stopped
        stopped = stopped or new[0] in tokenizer.stop_ids  # generation may run a few steps past the stop
        if stopped:
            return
        tokens.append(new[0])
        text = tokenizer.decode(tokens)
        if stream is not None and text.startswith(shown):
            stream(text[len(shown):])
            shown = text
    with half_precision(model):
        out = model.generate(batch, max_new_tokens, stop_ids=tokenizer.stop_ids, on_token=on_token, **sampling)[0]
    text = tokenizer.decode(out)
    if stream is not None and text.startswith(shown):
        stream(text[len(shown):])
    return text


# ----------------------------------------------------------------------------------------------------------------
# Predictions over a dataset, with metrics


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-level F1 on the normalised answers (whitespace tokens)."""
    p, r = data.normalize_answer(prediction).split(), data.normalize_answer(reference).split()
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def mix(media: dict) -> str:
    kinds = [m for m in MODALITIES if media.get(m)]
    return "+".join(kinds) if kinds else "text"


def prediction_metrics(rows: list[dict]) -> dict:
    """Exact match (training's normalisation) and token F1, overall and per mix of media."""
    def score(rs):
        return {"samples": len(rs),
                "exact_match": sum(data.normalize_answer(r["prediction"]) == data.normalize_answer(r["reference"])
                                   for r in rs) / max(len(rs), 1),
                "f1": sum(token_f1(r["prediction"], r["reference"]) for r in rs) / max(len(rs), 1)}
    groups = collections.defaultdict(list)
    for r in rows:
        groups[mix(r["media"])].append(r)
    return {**score(rows), "by_mix": {k: score(v) for k, v in sorted(groups.items())}}


def read_predictions(out: Path) -> dict[str, dict]:
    """The rows of a predictions file by id, for `--resume`. A last line cut short (no newline at its end: what a
    kill while writing leaves) is dropped from the file, saying so, and its sample is predicted again; any other
    line that is not a prediction row is a ValueError naming the file and line."""
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    cut = lines.pop()  # b"" when the file ends with a newline
    rows = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise ValueError("not an object with a string id")
        except ValueError as e:
            raise ValueError(f"{out}:{n}: not a line of predictions ({e}); fix or delete that line, or give a new "
                             "--out without --resume") from None
        if row["id"] in rows:
            raise ValueError(f"{out}:{n}: sample id {row['id']!r} is predicted twice; delete one of the lines")
        rows[row["id"]] = row
    if cut.strip():
        print(f"generate.py: {out}:{len(lines) + 1}: the last line was cut short (a stopped run); dropped, its "
              "sample is predicted again", file=sys.stderr)
        with open(out, "r+b") as f:
            f.truncate(len(raw) - len(cut))
    return rows


class OutputError(Exception):
    """An output of --predict could not be written (a read-only or full disk); the message names it."""


def check_outputs(out: Path, inputs: set[Path]) -> Path | None:
    """A ValueError (or FileNotFoundError), before anything is written, unless --out may take the
    predictions: it is none of the files read (`inputs`, hard links included), lies in no run, checkpoint or export
    folder (`owner`), and is new, empty or an earlier predictions file; its folder is writable. Returns the metrics
    file beside it, checked the same way, or None where --out is a stream (a pipe, /dev/stdout: the predictions
    are written through, and no file goes beside it)."""
    if out.exists() and not out.is_file() and not out.is_dir():  # a pipe or a character device
        return None
    target = out.resolve() if out.is_symlink() else out  # /dev/stdout redirected to a file: beside that file
    metrics = target.with_name(target.stem + ".metrics.json")
    for o, kind, key in ((out, "predictions", "prediction"), (metrics, "prediction metrics", "exact_match")):
        if o.is_dir():
            raise ValueError(f"{o}: is a folder; give --out a file, for example {o / 'pred.jsonl'}")
        if not o.parent.is_dir():
            raise FileNotFoundError(f"{o.parent}: no such folder; make it, or give --out a file in a folder that is "
                                    "there")
        hard_linked = o.exists() and o.stat().st_nlink > 1  # else no other path names this file
        if o.resolve() in inputs or (hard_linked and any(os.path.samefile(o, f) for f in inputs if f.exists())):
            raise ValueError(f"{o}: this is one of the files read (the dataset, a medium or the run's); writing it "
                             "would destroy it. Give --out a new file")
        folder, what = owner(o)
        if folder is not None:
            raise ValueError(f"{o}: lies in the {what} {folder}, whose files are its own; give --out a file "
                             "outside it")
        if o.is_file() and o.stat().st_size and not holds(o, key):
            raise ValueError(f"{o}: is there and is not a {kind} file of generate.py; it is kept. Give --out a new "
                             "file (or delete that one first)")
    probe = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:  # a read-only folder is found now, not after the model has loaded
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write in {out.parent} ({e.strerror}); give --out a file in a writable folder") \
            from None
    return metrics


def owner(path: Path) -> tuple[Path | None, str]:
    """The run, checkpoint or export folder that `path` lies in, by its marker file, and what it is."""
    for folder in path.resolve().parents:
        if (folder / "mmlora.json").is_file():
            return folder, "export folder"
        if (folder / "state.json").is_file():
            return folder, "checkpoint folder"
        if (folder / "run.lock").is_file() or (folder / "checkpoints").is_dir() and (folder / "config.json").is_file():
            return folder, "run folder"
    return None, ""


def holds(path: Path, key: str) -> bool:
    """Whether a file is one that generate.py writes: its first line (predictions: a JSON object a line) or its
    whole text (metrics: one JSON object) is a JSON object with `key`."""
    with open(path, "rb") as f:
        text = f.read(1 << 20) if key == "exact_match" else f.readline(1 << 20)
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and key in doc


class PredictionSet:
    """--predict's samples, read and checked before the model loads: the dataset (the prompt is every turn before
    its last reply, the reference that reply), the ids already in `out` with `resume`, and the loader of the rest,
    whose `workers` (DataLoader processes; 0: none) start decoding the media at once, longest prompts first, in
    batches of at most `batch_size` rows (`data.length_batches`; on a CPU also at most `batch_tokens` cache slots,
    65,536 by default). Samples that cannot be used are listed and skipped; ids must be unique, since they key
    `resume`; every prompt and `max_new_tokens` must fit the model's context. `out` and the metrics file may not
    name any of `inputs` (the run's files), the dataset or its media (`check_outputs`); `metrics_file` is None where
    `out` is a stream."""

    def __init__(self, path: str, out: Path, tokenizer: Tokenizer, aligner_config, cfg: Config, batch_size: int,
                 max_new_tokens: int, resume: bool, inputs: frozenset[Path], batch_tokens: int | None, workers: int,
                 device: torch.device):
        t_start = time.perf_counter()
        self.out = out
        self.ds = ds = data.ConversationDataset(path, tokenizer, aligner_config, cfg.model.tokens_per_media,
                                                cfg.data.max_len, truncate=True, on_error="skip",
                                                allow_outside_paths=True, max_audio_windows=cfg.data.max_audio_windows)
        data.check_unique_ids(ds.path, ds.examples, "predictions are keyed by sample id (--resume skips those done)")
        media = {f.resolve() for ex in ds.examples for m in MODALITIES for f in ex.media[m]}
        self.metrics_file = check_outputs(out, set(inputs) | media | {ds.path.resolve()})
        if resume and self.metrics_file is None:
            raise ValueError(f"{out}: --resume reads the predictions so far back, which a stream cannot give; give "
                             "--out a file")
        check_context(ds, max_new_tokens, model_context(cfg))
        for s in ds.skipped:
            print(f"skipped {s['file']}:{s['line']}: sample {s['id']!r}: {s['reason']}", file=sys.stderr)
        if not resume and out.is_file() and out.stat().st_size:
            print(f"generate.py: {out} holds earlier predictions, which these replace (--resume would continue "
                  "them instead)", file=sys.stderr)
        self.done = read_predictions(out) if resume and out.is_file() else {}
        self.ids = {ex.id for ex in ds.examples}
        foreign = sorted(set(self.done) - self.ids)
        if foreign:
            raise ValueError(f"{out}: holds predictions of ids that {path} does not have ({foreign[:3]}); it is "
                             "another dataset's: give a new --out, or leave out --resume")
        self.todo = [i for i, ex in enumerate(ds.examples) if ex.id not in self.done]
        self.resume = resume
        slots = batch_tokens or (1 << 16 if device.type == "cpu" else 1 << 40)
        self.batches = data.prompt_batches(ds, self.todo, batch_size, slots, max_new_tokens, tokenizer.pad_id,
                                           device, workers)
        self.dataset_s = time.perf_counter() - t_start


def model_context(cfg: Config) -> int:
    """The LLM's context (max_position_embeddings), from its config.json: known before the model loads."""
    path = Path(cfg.model.llm) / "config.json"
    return LLMConfig.from_hf(read_json(path, "a Hugging Face model folder needs config.json"),
                             str(path)).max_position_embeddings


def prompt_length(ex: data.Example) -> int:
    """The tokens of a sample's prompt: its conversation up to where its last reply starts (label t is the target
    of position t, token t + 1)."""
    t = max(i for i, x in enumerate(ex.labels) if x != -100)
    while t > 0 and ex.labels[t - 1] != -100:
        t -= 1
    return t + 1


def check_context(ds: data.ConversationDataset, max_new_tokens: int, context: int) -> None:
    """A ValueError naming the sample with the longest prompt, if it and `max_new_tokens` pass the context: the
    rule a single question follows (`prompt_item`)."""
    ex = max(ds.examples, key=prompt_length)
    n = prompt_length(ex)
    if n + max_new_tokens > context:
        fix = f"lower --max_new_tokens to {context - n} at most" if n < context else "shorten that sample"
        raise ValueError(f"{ds.path}:{ex.line}: sample {ex.id!r}: its prompt is {n} tokens and --max_new_tokens "
                         f"asks for {max_new_tokens} more, more than the model's context of {context}; {fix}")


def predict(model: MultimodalLM, tokenizer: Tokenizer, cfg: Config, path: str, out: Path, batch_size: int,
            max_new_tokens: int, sampling: dict, resume: bool, inputs: frozenset[Path] = frozenset(),
            batch_tokens: int | None = None, workers: int = 0, samples: PredictionSet | None = None) -> dict:
    """Answer every sample of a dataset (`PredictionSet`: what is read and checked, and how the media are
    decoded; `samples` if it was made before the model loaded), at most `batch_size` rows at a time and
    `batch_tokens` cache slots in all (default: `cache_slots`). With a decoder in `sampling` (decode.GraphDecoder,
    on a GPU), a finished answer's row takes the next prompt (continuous batching); else each batch is answered
    whole (`MultimodalLM.generate`). One JSON line per sample is written as its answer ends; `resume` skips the ids
    already in `out`. Returns the metrics, also written to `<out stem>.metrics.json` with the time taken
    (`timing`: from the first batch on, so without loading), where `out` is a file (a stream, /dev/stdout say,
    gets the lines only). A write that fails (a full disk) is an OutputError naming `out`."""
    samples = samples or PredictionSet(path, out, tokenizer, model.aligner.config, cfg, batch_size, max_new_tokens,
                                       resume, inputs, batch_tokens, workers, model.llm.lm_head.weight.device)
    ds, done, todo, batches = samples.ds, samples.done, samples.todo, samples.batches
    slots = batch_tokens or cache_slots(model.llm)

    def decoded():  # (kept samples and their references, their prompts), the samples that do not decode listed
        for kept, references, bad, batch in batches:
            for i in bad:
                print(f"skipped {ds.path}:{ds.examples[i].line}: sample {ds.examples[i].id!r}: a medium does "
                      "not decode", file=sys.stderr)
            if batch is not None:
                yield list(zip(kept, references)), batch
    t0, written, first, shown = time.perf_counter(), 0, None, 0.0
    rows = list(done.values())  # the metrics are of these, never read back from `out` (which may be a pipe)
    fd = open_output(out, samples.resume)
    try:
        with half_precision(model):
            for answered in model.answer_batches(decoded(), max_new_tokens, tokenizer.stop_ids, rows=batch_size,
                                                 slots=slots, **sampling):
                new = [{"id": ds.examples[i].id, "prediction": tokenizer.decode(o), "reference": reference,
                        "media": {m: [str(p) for p in ds.examples[i].media[m]] for m in MODALITIES}}
                       for (i, reference), o in answered]
                write_all(fd, "".join(json.dumps(r) + "\n" for r in new).encode(), out)  # whole lines, one write
                rows += new
                now = time.perf_counter()
                first = first or samples.dataset_s + now - t0
                written += len(answered)
                if now - shown >= 1.0 or written == len(todo):  # progress at most once a second
                    shown, rate = now, written / (now - t0)
                    print(f"{len(done) + written}/{len(done) + len(todo)} samples | {rate:.1f} samples/s | ETA "
                          f"{data.duration((len(todo) - written) / max(rate, 1e-9))}", file=sys.stderr, flush=True)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    metrics = prediction_metrics(rows)
    metrics["timing"] = {"samples": written, "seconds": round(seconds, 3), "samples_per_s": round(written / seconds, 1)
                         if seconds > 0 else None, "first_answer_s": None if first is None else round(first, 3),
                         "dataset_s": round(samples.dataset_s, 3)}
    if samples.metrics_file is not None:
        try:
            write_json(samples.metrics_file, metrics)
        except OSError as e:
            raise OutputError(f"cannot write {samples.metrics_file} ({e.strerror}); the predictions are whole") \
                from None
    return metrics


def open_output(out: Path, resume: bool) -> int:
    """--out opened for writing (appended to with `resume`, else emptied; a stream as it is): its descriptor."""
    try:
        return os.open(out, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resume else os.O_TRUNC), 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {out} ({e.strerror})") from None


def write_all(fd: int, text: bytes, out: Path) -> None:
    """`text` written to `fd` whole, unbuffered (so that nothing waits in a buffer to fail again at close); a
    write that fails is an OutputError naming `out`."""
    view = memoryview(text)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise OutputError(f"cannot write {out} ({e.strerror})") from None


def cache_slots(llm, share: float = 0.25) -> int:
    """The cache slots (rows x length) that `share` of the GPU's free memory holds (vLLM's memory share, kept low:
    the prompts' passes need room too), which bound --predict's rows; 65,536 on a CPU."""
    w = llm.model.embed_tokens.weight
    if not w.is_cuda:
        return 1 << 16
    c = llm.config
    per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * w.dtype.itemsize  # k and v
    return int(share * torch.cuda.mem_get_info(w.device)[0]) // per_slot


# ----------------------------------------------------------------------------------------------------------------
# Command line

CHAT_HELP = "chat: /image PATH, /audio PATH attach a medium to the next question; /reset; /exit"


def show(text: str) -> None:
    """A piece of an answer, on stdout as it comes."""
    print(text, end="", flush=True)


def chat(model: MultimodalLM, tokenizer: Tokenizer, cfg: Config, args, sampling: dict) -> None:
    """Multi-turn chat on stdin: a line is a question; /image P and /audio P attach a medium to the next question
    (decoded there, so that a bad one is refused at once and never left pending), /reset forgets the conversation,
    /exit ends."""
    messages, media, pending = [], [], []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(CHAT_HELP, file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        command, _, path = line.partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            messages, media, pending = messages[:1] if args.system else [], [], []
            continue
        if command in ("/image", "/audio"):
            try:
                if not path.strip():
                    raise ValueError(f"{command} needs a file: {command} PATH")
                decode_medium(command[1:], path.strip(), model, cfg)
                pending.append((command[1:], path.strip()))
            except (ValueError, FileNotFoundError, ImportError) as e:
                print(f"generate.py: {e}; not attached", file=sys.stderr)
            continue
        if command.startswith("/") and len(command) > 1 and command[1:].isalpha():
            print(f"generate.py: unknown command {command}; {CHAT_HELP.removeprefix('chat: ')}", file=sys.stderr)
            continue
        try:
            turn = {"role": "user", "content": user_turn(line, pending)}
            item = prompt_item(messages + [turn], media + pending, tokenizer, model, cfg, args.max_new_tokens)
        except (ValueError, FileNotFoundError, ImportError) as e:
            kept = f" (still attached: {', '.join(p for _, p in pending)})" if pending else ""
            print(f"generate.py: {e}{kept}", file=sys.stderr)
            continue
        reply = answer(model, tokenizer, item, args.max_new_tokens, sampling, stream=show)
        print()
        messages += [turn, {"role": "assistant", "content": reply}]
        media, pending = media + pending, []


def parser() -> argparse.ArgumentParser:
    """generate.py's command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("question", nargs="?", help="one question (else --chat, --predict or --export)")
    ap.add_argument("--run", required=True, help="a run folder (run.out_dir) or an export folder")
    ap.add_argument("--checkpoint", default="best", help="best (default), latest, or a checkpoint folder")
    ap.add_argument("--image", action="append", default=[], help="an image for the question (repeatable)")
    ap.add_argument("--audio", action="append", default=[], help="an audio clip for the question (repeatable)")
    ap.add_argument("--system", default="", help="a system message")
    ap.add_argument("--chat", action="store_true", help="multi-turn chat on stdin")
    ap.add_argument("--predict", metavar="DATA", help="answer every sample of a dataset (JSONL or JSON list)")
    ap.add_argument("--out", help="with --predict: the JSONL of predictions")
    ap.add_argument("--resume", action="store_true", help="with --predict: skip ids already in --out")
    ap.add_argument("--batch_size", type=int, default=512, help="with --predict: rows decoded together, at most")
    ap.add_argument("--batch_tokens", type=int, help="with --predict: cache slots in all, at most (rows x (longest "
                    "sample + max_new_tokens)); default: what a quarter of the GPU's free memory holds, 65,536 on a "
                    "CPU")
    ap.add_argument("--workers", type=int, help="with --predict: DataLoader processes that decode the media "
                    "(default: up to 8 on a GPU, 0 on a CPU)")
    ap.add_argument("--export", metavar="DIR", help="write the export folder (adapter/, merged/, ...) to DIR")
    ap.add_argument("--max_new_tokens", type=int, help="default: 256, or the run's train.max_new_tokens with --predict")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="on a GPU: the recorded decode steps compiled too, faster "
                    "for long answers at small batches (compiling takes a minute or more per shape); --predict "
                    "keeps the eager recorded steps")
    ap.add_argument("--eager", action="store_true", help="on a GPU: decode step by step, neither recorded nor "
                    "compiled (the plain path)")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU if there is one")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on a GPU, float32 on a CPU")
    return ap


def checked_config(args) -> Config:
    """The run's config for generation, the options checked against it before the model loads."""
    cfg = run_config(args.run, args.device, args.dtype)
    check_options(args, model_context(cfg))
    return cfg


def loaded(args, tokenizer: Tokenizer | None = None) -> tuple[MultimodalLM, Tokenizer, Config, dict]:
    """The model of --run, its tokenizer and config, and the sampling and decoding arguments of its generate."""
    model, tokenizer, cfg = load_run(args.run, args.checkpoint, args.device, args.dtype, tokenizer)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                **decoding(model.llm, args)}
    return model, tokenizer, cfg, sampling


def answering(args) -> tuple[MultimodalLM, Tokenizer, Config, dict]:
    """A question's or a chat's model (`loaded`), the options checked first; --max_new_tokens 256 by default."""
    checked_config(args)
    args.max_new_tokens = 256 if args.max_new_tokens is None else args.max_new_tokens
    return loaded(args)


def ask_mode(args) -> None:
    """A question, with its --image and --audio: the answer, streamed to stdout."""
    model, tokenizer, cfg, sampling = answering(args)
    media = [("image", p) for p in args.image] + [("audio", p) for p in args.audio]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": user_turn(args.question, media)})
    item = prompt_item(messages, media, tokenizer, model, cfg, args.max_new_tokens)
    answer(model, tokenizer, item, args.max_new_tokens, sampling, stream=show)
    print()


def chat_mode(args) -> None:
    """--chat: a conversation on stdin (`chat`)."""
    model, tokenizer, cfg, sampling = answering(args)
    chat(model, tokenizer, cfg, args, sampling)


def predict_mode(args) -> None:
    """--predict DATA --out PRED.jsonl: every sample answered (`predict`), the metrics summed up."""
    cfg = checked_config(args)
    out = Path(args.out)
    inputs = frozenset(input_files(Path(args.run), args.checkpoint) | {Path(args.predict).resolve()})
    args.max_new_tokens = cfg.train.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    cuda = uses_cuda(cfg)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() - 1) if cuda else 0
    # read and checked before the model loads, while the loader's workers (forked now, from a process without a GPU
    # context yet) decode the first batches' media
    tokenizer = load_tokenizer(cfg.model.llm, cfg.model.chat_format or None)
    samples = PredictionSet(args.predict, out, tokenizer, aligner_config(cfg.model.aligner), cfg, args.batch_size,
                            args.max_new_tokens, args.resume, inputs, args.batch_tokens, workers,
                            torch.device("cuda" if cuda else "cpu"))
    model, tokenizer, cfg, sampling = loaded(args, tokenizer)
    metrics = predict(model, tokenizer, cfg, args.predict, out, args.batch_size, args.max_new_tokens, sampling,
                      args.resume, inputs, args.batch_tokens, workers, samples)
    t = metrics["timing"]
    print(f"{t['samples']} answered in {t['seconds']:.2f} s ({t['samples_per_s']} samples/s), the first batch "
          f"{t['first_answer_s']} s after reading started", file=sys.stderr)
    summary = sys.stderr if same_file(out, sys.stdout) else sys.stdout  # off the predictions' stream
    print(f"{metrics['samples']} samples | exact match {100 * metrics['exact_match']:.1f}% | token F1 "
          f"{100 * metrics['f1']:.1f}% | " + ", ".join(f"{k} {100 * v['exact_match']:.1f}% ({v['samples']})"
                                                      for k, v in metrics["by_mix"].items()), file=summary)


def export_mode(args) -> None:
    """--export DIR: the export folder (adapter/, merged/, projectors, aligner), from a run folder."""
    if (Path(args.run) / "mmlora.json").is_file():
        raise ValueError(f"{args.run} is an export folder already; export from the run folder")
    check_export_folder(Path(args.export))  # before the minutes of loading
    check_options(args, None)
    model, _, cfg = load_run(args.run, args.checkpoint, args.device or "cpu", "float32")
    export(model, Path(args.export), cfg, getattr(torch, args.dtype) if args.dtype else None)
    print(f"exported to {args.export}: adapter/ (peft), merged/ (transformers), projectors, aligner")


MODES = {"question": ask_mode, "chat": chat_mode, "predict": predict_mode, "export": export_mode}  # option -> mode


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    chosen = [option for option in MODES if getattr(args, option)]
    if len(chosen) != 1:
        ap.error("give one of: a question, --chat, --predict DATA --out PRED.jsonl, --export DIR")
    if args.predict and not args.out:
        ap.error("--predict needs --out PRED.jsonl")
    try:
        MODES[chosen[0]](args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointWriteError) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        sys.exit(2)
    except OutputError as e:
        print(f"generate.py: {e}; {stopped_note(args, argv)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # off the line that ^C was echoed on
        print(f"generate.py: stopped (Ctrl-C). {stopped_note(args, argv)}", file=sys.stderr)
        sys.exit(130)


def check_options(args, context: int | None) -> None:
    """A ValueError naming the first option out of its range, before the model loads (0 is a value, never "the
    default"); `--max_new_tokens` also below the model's `context`, where known (the prompt takes part of it)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: give 1 or more")
    if args.max_new_tokens is not None and context is not None and args.max_new_tokens >= context:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: more than the model's context of {context} "
                         "tokens, which holds the prompt too; give fewer")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: give 1 or more (rows decoded together)")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise ValueError(f"--batch_tokens {args.batch_tokens}: give 1 or more (cache slots in all), or leave it out")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (decode media in this process) or more")
    if not args.temperature >= 0:  # nan too
        raise ValueError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p {args.top_p}: give a value in (0, 1] (1: every token)")
    if args.top_k < 0:
        raise ValueError(f"--top_k {args.top_k}: give 0 (every token) or more")


def same_file(path: Path, stream) -> bool:
    """Whether `path` names the file `stream` (sys.stdout, say) writes to."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.path.samestat(os.stat(path), os.fstat(stream.fileno()))
    return False


def decoding(llm, args) -> dict:
    """How the decode steps run, as `LLM.generate`'s arguments: the decoder that `decode.choose_decoder` picks, on a
    GPU by default the eager steps recorded as CUDA graphs (a recording is one run of the steps, so there is no
    wait), sampling from the default CUDA generator, seeded here; with --compile, those steps compiled first, except
    in --predict, where many batch shapes each compiling for a minute or more cost more than the short answers gain
    (it says so). With --eager, on a CPU or for a sliding-window model, `LLM.decode`, step by step, sampling with
    its own generator."""
    if args.compile and not llm.lm_head.weight.is_cuda:
        raise ValueError("--compile replays CUDA graphs: it needs a GPU")
    if args.compile and args.eager:
        raise ValueError("--compile and --eager exclude each other; give one")
    decoder = choose_decoder(llm, eager=args.eager, compile=args.compile and not args.predict)
    if decoder is None:
        return {"generator": torch.Generator(llm.lm_head.weight.device).manual_seed(args.seed)}
    if args.compile and args.predict:
        print("generate.py: --predict records the eager decode steps as CUDA graphs without compiling them: "
              "compiling each batch shape takes longer than its short answers", file=sys.stderr)
    torch.manual_seed(args.seed)  # recorded sampling draws from the default CUDA generator
    return {"decoder": decoder}


def stopped_note(args, argv: list[str] | None) -> str:
    """What a Ctrl-C leaves, in words: where the predictions so far are and the command that continues them."""
    if args.export:
        return f"{args.export} is as it was before"
    if not args.predict:
        return "Nothing was written"
    out = Path(args.out)
    if out.exists() and not out.is_file():
        return f"the predictions so far went to {out}"
    done = sum(1 for line in out.read_bytes().split(b"\n") if line.strip()) if out.is_file() else 0
    cmd = [sys.executable, "generate.py", *(sys.argv[1:] if argv is None else argv)]
    if "--resume" not in cmd:
        cmd.append("--resume")
    return (f"{done} predictions are in {out}; continue with: "
            + " ".join(shlex.quote(str(c)) for c in cmd))


if __name__ == "__main__":
    main()

"""Serve what you trained: an OpenAI-compatible server with image and audio input, on decode.py's continuous
batching, several runs of one base in one batch, a chat page and Prometheus metrics.

    python serve.py --run runs/demo                              # http://127.0.0.1:8000/ : the chat page
    python serve.py --run a=runs/a --run b=out/export-b          # two runs of one base; a request's "model" picks
    python serve.py --run runs/demo --host 0.0.0.0 --api_key KEY # reachable from other machines: a key, or --insecure

    from openai import OpenAI                                    # any OpenAI client
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What colour is the shape?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0..."}}]}])

Endpoints: POST /v1/chat/completions (OpenAI's schema: content as a string or as text, image_url (a data: URL) and
input_audio (base64 WAV) parts; stream=true gives server-sent events ending in `data: [DONE]`), GET /v1/models,
GET /health (200; 503 while draining), GET /metrics (Prometheus), GET / (chat.html, beside this file).

One engine thread owns the model (`Engine`): a request waits until the decoder's next admission, then decodes in
the running batch with its own sampling, stop strings and token limit (`decode.GraphDecoder.stream` with
`decode.RowSettings`; on a GPU its steps are recorded CUDA graphs, one for each row count, all recorded before
the first request; on a CPU they run eagerly). Media are decoded
in the HTTP layer's threads. Runs given together share one base LLM and aligner: each row applies its own run's
LoRA (`lora.BatchedLoRALinear`, nothing merged) and projectors; one run alone decodes with its adapters merged.
What the server does not support (n > 1, tools, logprobs, remote or local image paths, ...) is a 400 with OpenAI's
error object naming the field; every bad request is a 4xx JSON error and the others go on. SIGTERM stops
admitting (503), lets the requests in flight finish for up to --drain_s seconds, cancels the rest, and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import dataclasses
import filecmp
import functools
import hmac
import ipaddress
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import ClassVar

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

import build
import data
import generate
import lora
from checkpoint import read_checkpoint
from config import Config
from decode import GraphDecoder, RowSettings, choose_decoder, sample_rows
from media import wav_info
from multimodal import MODALITIES, MultimodalLM
from tokenizer import Tokenizer, load_tokenizer
from weights import check_tensors, read_json, read_safetensors

CHAT_PAGE = Path(__file__).resolve().with_name("chat.html")


# ----------------------------------------------------------------------------------------------------------------
# The runs served: one alone (generate.load_run), or several on one base with their adapters side by side


@dataclasses.dataclass
class Run:
    """A served run: its name (a request's `model`), folder, model (several runs share the LLM and the aligner,
    each with its own projectors), tokenizer, config, and its index among the runs (its rows' adapters)."""
    name: str
    path: Path
    model: MultimodalLM
    tokenizer: Tokenizer
    cfg: Config
    index: int = 0


@dataclasses.dataclass
class RunParts:
    """What one of several runs adds to the shared base: its LoRA and projector tensors, read from a run folder's
    checkpoint or an export folder's adapter/ and projectors."""
    cfg: Config
    base: Path  # the base LLM's folder, resolved
    aligner: Path  # the aligner's folder, resolved
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> A (r, in), B (out, r) times alpha / r
    projectors: dict[str, torch.Tensor]


def run_parts(path: Path, checkpoint: str, device: str | None, dtype: str | None) -> RunParts:
    cfg = generate.run_config(path, device, dtype)
    if (path / "mmlora.json").is_file():  # an export: adapter/ in peft's format, on the base the export names
        doc = read_json(path / "mmlora.json", "")
        conf = read_json(path / "adapter" / "adapter_config.json", "")
        tensors = {k.removeprefix(lora.PEFT_PREFIX): v
                   for k, v in read_safetensors(path / "adapter" / "adapter_model.safetensors").items()}
        scaling, base, aligner = conf["lora_alpha"] / conf["r"], doc["base_model"], path / doc["aligner"]
        projectors = read_safetensors(path / doc["projectors"])
    else:
        _, trainable = read_checkpoint(generate.checkpoint_folder(path, checkpoint), "trainable.safetensors",
                                       hint=generate.CHECKPOINT_HINT)
        tensors = {k.removeprefix("llm."): v for k, v in trainable.items() if k.startswith("llm.")}
        projectors = {k.removeprefix("projectors."): v for k, v in trainable.items() if k.startswith("projectors.")}
        scaling, base, aligner = cfg.lora.alpha / cfg.lora.rank, cfg.model.llm, cfg.model.aligner
    adapters = {k.removesuffix(".lora_A.weight"): (a, tensors[k.replace(".lora_A.", ".lora_B.")] * scaling)
                for k, a in tensors.items() if k.endswith(".lora_A.weight")}
    return RunParts(cfg, Path(base).resolve(), Path(aligner).resolve(), adapters, projectors)


def same_aligner(a: Path, b: Path) -> bool:
    """One folder, or two holding the same files (an export's copy of the aligner)."""
    names = ("aligner.json", "aligner.safetensors")
    return a == b or all((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False)
                         for n in names)


def load_runs(specs: list[tuple[str, Path]], checkpoint: str, device: str | None, dtype: str | None,
              rows: RowSettings) -> list[Run]:
    """The runs to serve, on the GPU when there is one. Several runs must share one base LLM (the same folder,
    quantized alike) and one aligner; a run that does not is a ValueError naming both paths. Their adapters go
    side by side into `lora.BatchedLoRALinear` layers that pick each row's by its run (`rows.run`)."""
    if len(specs) == 1:
        (name, path), = specs
        model, tokenizer, cfg = generate.load_run(path, checkpoint, device, dtype)
        return [Run(name, path, model, tokenizer, cfg)]
    parts = [run_parts(path, checkpoint, device, dtype) for _, path in specs]
    first, (_, first_path) = parts[0], specs[0]
    for (_, path), p in zip(specs[1:], parts[1:]):
        if (p.base, p.cfg.model.quantize) != (first.base, first.cfg.model.quantize):
            raise ValueError(f"{path} runs on the base LLM {p.base} (quantize = {p.cfg.model.quantize}), {first_path} "
                             f"on {first.base} (quantize = {first.cfg.model.quantize}): runs served together share "
                             "one base; serve the others from a process of their own")
        if not same_aligner(p.aligner, first.aligner):
            raise ValueError(f"{path} uses the aligner {p.aligner}, {first_path} the aligner {first.aligner}: runs "
                             "served together share one aligner; serve the others from a process of their own")
    cfg = first.cfg
    cfg.model.llm, cfg.model.aligner = str(first.base), str(first.aligner)
    target = torch.device("cuda" if generate.uses_cuda(cfg) else "cpu")
    tokenizer, base = build.build_model(cfg, target, adapters=False)
    runs = []
    for i, ((name, path), p) in enumerate(zip(specs, parts)):
        model = build.assemble(p.cfg, base.llm, base.aligner, base.media_token_ids, adapters=False).eval()
        found = {k: v for k, v in p.projectors.items() if not (p.cfg.model.shared_projector and k.startswith("audio."))}
        expected = dict(model.projectors.named_parameters())  # a shared projector once
        check_tensors({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in found.items()},
                      f"{path}: the projectors do not fit its config")
        with torch.no_grad():
            for k, v in found.items():
                expected[k].copy_(v)
        same = (p.cfg.model.chat_format or None) == (cfg.model.chat_format or None)
        runs.append(Run(name, path, model, tokenizer if same else load_tokenizer(first.base, p.cfg.model.chat_format),
                        p.cfg, i))
    llm = base.llm
    for name in sorted(set().union(*(p.lora for p in parts))):
        parent, _, child = name.rpartition(".")
        batched = lora.BatchedLoRALinear(llm.get_submodule(name), [p.lora.get(name) for p in parts],
                                         functools.partial(rows.now, rows.run))
        setattr(llm.get_submodule(parent), child, batched)
    for layer in llm.model.layers:  # q, k and v run through their modules again (lora.fuse_qkv held the old ones)
        layer.self_attn.fused_qkv = None
    return runs


def run_specs(given: list[str]) -> list[tuple[str, Path]]:
    """--run PATH or --run NAME=PATH, repeated: (name, folder) each; a run's name defaults to its folder's."""
    specs = []
    for g in given:
        name, eq, rest = g.partition("=")
        name, path = (name, Path(rest)) if eq and "/" not in name else (None, Path(g))
        specs.append((name or path.resolve().name, path))
    names = [n for n, _ in specs]
    if len(set(names)) < len(names):
        raise ValueError(f"two runs are named alike ({names}); name them: --run NAME=PATH")
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Requests: OpenAI's schema checked, media decoded, every refusal one error object naming the field


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error object (message, type, param, code)."""
    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
        429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        def printable(s):  # a request's lone surrogate (in a key it names, say) written as its escape
            return s.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(s, str) else s
        return {"error": {"message": printable(self.message), "type": self.TYPES.get(self.status,
                          "invalid_request_error"), "param": printable(self.param), "code": self.code}}


@dataclasses.dataclass
class Limits:
    """What one request may ask for (each a flag)."""
    body_bytes: int = 32 << 20
    prompt_tokens: int = 2048
    max_tokens: int = 512
    image_pixels: int = 4096 * 4096
    audio_seconds: float = 60.0  # and at most each run's data.max_audio_windows windows
    waiting: int = 512


@dataclasses.dataclass
class Ask:
    """A chat request as checked: the run, the conversation (placeholders where its media go), the media
    (modality, the field that holds it, its bytes) in placeholder order, and the settings."""
    run: Run
    messages: list[dict]
    media: list[tuple[str, str, bytes]]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool


UNSUPPORTED = {"tools": "tools", "tool_choice": "tools", "functions": "function calling",
               "function_call": "function calling", "parallel_tool_calls": "tools", "logit_bias": "logit_bias",
               "audio": "audio output", "prediction": "predicted outputs", "web_search_options": "web search"}
IGNORED = {"user", "metadata", "store", "service_tier"}  # about the caller, not the answer
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
         "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
         "response_format", "modalities", *UNSUPPORTED, *IGNORED}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def number(doc: dict, key: str, kind: type, low: float, high: float, default):
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not low <= v <= high:
        raise ApiError(400, f"{key} must be {'a number' if kind is float else 'an integer'} from {low} to {high}, "
                       f"got {v!r}", key)
    return kind(v)


def parse_request(doc, runs: dict[str, Run], limits: Limits) -> Ask:
    """A chat request's JSON checked against what this server does: an ApiError naming the first field that it
    cannot honour, never a field ignored that would change the answer."""
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object")
    for key in doc:
        if key not in KNOWN:
            raise ApiError(400, f"unrecognized request argument: {key}", key)
        if key in UNSUPPORTED and doc[key] is not None:
            raise ApiError(400, f"{UNSUPPORTED[key]} is not supported by this server ({key})", key)
    model = doc.get("model")
    if not isinstance(model, str) or model not in runs:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {sorted(runs)}", "model",
                       "model_not_found")
    if doc.get("n", 1) != 1:
        raise ApiError(400, "n > 1 is not supported: one answer per request", "n")
    if doc.get("logprobs") or doc.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs" if doc.get("logprobs") else "top_logprobs")
    for key in ("presence_penalty", "frequency_penalty"):
        if doc.get(key):
            raise ApiError(400, f"{key} is not supported (only 0)", key)
    if (doc.get("response_format") or {"type": "text"}) != {"type": "text"}:
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format")
    if doc.get("modalities") not in (None, ["text"]):
        raise ApiError(400, "the server answers in text only", "modalities")
    run = runs[model]
    messages, media = parse_messages(doc.get("messages"))
    key = "max_completion_tokens" if doc.get("max_completion_tokens") is not None else "max_tokens"
    given = doc.get(key)  # a null counts as absent
    max_tokens = number({key: given}, key, int, 1, limits.max_tokens, None)
    stop = doc.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = doc.get("stream") or False
    options = doc.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream must be true or false, stream_options at most {\"include_usage\": bool}",
                       "stream" if not isinstance(stream, bool) else "stream_options")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream = true", "stream_options")
    return Ask(run, messages, media, max_tokens, number(doc, "temperature", float, 0.0, 2.0, 1.0),
               number(doc, "top_p", float, 1e-9, 1.0, 1.0), number(doc, "seed", int, -2**63, 2**63 - 1,
                                                                   random.getrandbits(32)) % 2**32,
               stop, stream, bool(options.get("include_usage")))


def parse_messages(messages) -> tuple[list[dict], list[tuple[str, str, bytes]]]:
    """OpenAI's messages -> ours (each part's medium becomes its placeholder, in place) and the media's bytes."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out, media = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"{where}.role must be one of {sorted(ROLES)} (got {role!r}; tools are not "
                           "supported)", f"{where}.role")
        for key in m:
            if key not in ("role", "content", "name"):
                raise ApiError(400, f"{where}.{key} is not supported", f"{where}.{key}")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        text, first = "", len(media)
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]" if not isinstance(content, str) else f"{where}.content"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{at}.text must be a string", f"{at}.text")
                try:
                    part["text"].encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(400, f"{at} is not valid Unicode (a lone surrogate)", at) from None
                text += part["text"]
            elif kind in ("image_url", "input_audio") and m["role"] == "assistant":
                raise ApiError(400, f"{at}: media belong to user and system messages", f"{at}.type")
            elif kind == "image_url":
                media.append(("image", f"{at}.image_url", data_url(part.get("image_url"), f"{at}.image_url")))
                text += data.PLACEHOLDERS["image"] + "\n"
            elif kind == "input_audio":
                audio = part.get("input_audio")
                if not isinstance(audio, dict):
                    raise ApiError(400, f"{at}.input_audio must be an object {{\"data\": base64 WAV, \"format\": "
                                   "\"wav\"}", f"{at}.input_audio")
                if audio.get("format") != "wav":
                    raise ApiError(400, f"{at}.input_audio.format must be \"wav\" (got {audio.get('format')!r})",
                                   f"{at}.input_audio.format")
                media.append(("audio", f"{at}.input_audio", base64_bytes(audio.get("data"), f"{at}.input_audio.data")))
                text += data.PLACEHOLDERS["audio"] + "\n"
            else:
                raise ApiError(400, f"{at}: a part is {{\"type\": \"text\" | \"image_url\" | \"input_audio\", ...}} "
                               f"(got type {kind!r})", f"{at}.type")
        attached = [kind for kind, _, _ in media[first:]]
        if any(text.count(p) != attached.count(k) for k, p in data.PLACEHOLDERS.items()):  # the text's own, or split
            raise ApiError(400, f"{where}.content holds <image> or <audio>, which stand for media here: send media "
                           "as image_url or input_audio parts", f"{where}.content")
        out.append({"role": ROLES[m["role"]], "content": text})
    return out, media


def data_url(image_url, param: str) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise ApiError(400, f"{param}.url must be a string (a data: URL)", f"{param}.url")
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{param}.url: remote images are not fetched; send the image inline as a data: URL "
                       "(data:image/png;base64,...)", f"{param}.url")
    head, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise ApiError(400, f"{param}.url must be a base64 data: URL (data:image/png;base64,...); local paths and "
                       "other URLs are refused: the server never reads its own disk for a request", f"{param}.url")
    mime = head.removeprefix("data:").removesuffix(";base64").lower()
    if mime and not mime.startswith("image/"):  # what the bytes are, Pillow finds out; a declared non-image is refused
        raise ApiError(400, f"{param}.url is a data: URL of type {mime}, not an image", f"{param}.url")
    return base64_bytes(payload, f"{param}.url")


def base64_bytes(text, param: str) -> bytes:
    try:
        if not isinstance(text, str) or not text:
            raise ValueError("empty")
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ApiError(400, f"{param} is not base64 data", param) from None


MAX_ASPECT = 200  # an image's longer side over its shorter, at most


def decode_media(ask: Ask, limits: Limits) -> dict[str, list[torch.Tensor]]:
    """The request's media as `generate.decode_medium` gives them, checked against the limits from their headers
    before they are decoded; runs in the HTTP layer's threads, never the engine's."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    run, raw = ask.run, {m: [] for m in MODALITIES}
    if not ask.media:  # a text-only request makes no folder
        return raw
    clip = run.model.aligner.config.clip_seconds
    seconds = min(limits.audio_seconds, run.cfg.data.max_audio_windows * clip)
    with tempfile.TemporaryDirectory(prefix="mmlora-serve-") as tmp:
        for n, (kind, param, blob) in enumerate(ask.media):
            f = Path(tmp) / f"{n}.{'wav' if kind == 'audio' else 'img'}"
            f.write_bytes(blob)
            try:
                if kind == "image":
                    if Image is None:
                        raise ApiError(400, "this server cannot decode images: Pillow is not installed on it "
                                       "(pip install pillow)", param)
                    with Image.open(f) as im:
                        w, h = im.size
                    if (pixels := w * h) > limits.image_pixels:
                        raise ApiError(400, f"{param}: the image has {pixels:,} pixels, more than this server takes "
                                       f"({limits.image_pixels:,}, --max_image_pixels)", param)
                    if max(w, h) > MAX_ASPECT * min(w, h):  # resizing a sliver to a square costs out of proportion
                        raise ApiError(400, f"{param}: the image is {w} x {h}; sides further apart than "
                                       f"{MAX_ASPECT}:1 are refused (as Qwen2-VL's processor refuses them)", param)
                else:
                    info = wav_info(f)
                    length = info.data_bytes / (info.channels * info.bits // 8) / info.rate
                    if length > seconds:
                        raise ApiError(400, f"{param}: the clip is {length:.1f} s, more than this server takes "
                                       f"({seconds:g} s: --max_audio_seconds, and {run.cfg.data.max_audio_windows} "
                                       f"windows of {clip:g} s)", param)
                raw[kind].append(generate.decode_medium(kind, f, run.model, run.cfg))
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001  PIL's, wav_info's and decode_medium's: the medium does not decode
                message = str(e).replace(f"{f}: ", "").replace(str(f), "the file")
                raise ApiError(400, f"{param}: cannot decode the {kind} ({message})", param) from None
    return raw


# ----------------------------------------------------------------------------------------------------------------
# The engine: one thread owns the model and feeds the decoder the requests as they come


class Metrics:
    """Prometheus metrics of one server (a registry of its own)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mmlora_requests", "Chat completion requests by final HTTP status (499: the client "
                                "went away)", ["status"], registry=r)
        self.ttft = Histogram("mmlora_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10, 30),
                              registry=r)
        self.tpot = Histogram("mmlora_time_per_output_token_seconds", "A request's time per output token after its "
                              "first", buckets=(.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .25, .5,
                                                1), registry=r)
        self.e2e = Histogram("mmlora_e2e_request_latency_seconds", "From a request's arrival to its answer's end",
                             buckets=(.1, .25, .5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300), registry=r)
        self.prompt_tokens = Counter("mmlora_prompt_tokens", "Prompt tokens admitted (media tokens included)",
                                     registry=r)
        self.generation_tokens = Counter("mmlora_generation_tokens", "Output tokens sent", registry=r)
        self.running = Gauge("mmlora_requests_running", "Requests decoding in the batch", registry=r)
        self.waiting = Gauge("mmlora_requests_waiting", "Requests waiting for a row", registry=r)
        self.slots = Gauge("mmlora_cache_slots_in_use", "KV-cache slots held by running requests (rows x length)",
                           registry=r)
        self.slots_total = Gauge("mmlora_cache_slots", "KV-cache slots of the batch (rows x length)", registry=r)


class Request:
    """One chat completion in flight: its prompt and settings, the tokens and text sent so far, and the events its
    HTTP handler awaits, ("text", str), ("end", finish_reason) or ("error", ApiError), put by the engine thread
    through the event loop."""

    def __init__(self, ask: Ask, item: data.Item, max_tokens: int, loop: asyncio.AbstractEventLoop):
        self.ask, self.item, self.max_tokens, self.loop = ask, item, max_tokens, loop
        self.key, self.id, self.created = uuid.uuid4().hex, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.sent, self.reason, self.error = "", None, None  # error: why the server ended it (an ApiError)
        self.gone = False  # the client went away
        self.t0, self.t_first = time.perf_counter(), None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server stopped)
            pass

    def update(self, tokens: list[int], tokenizer: Tokenizer, final: bool) -> bool:
        """New tokens (all so far): send the text that can no longer change; True when the request is complete
        (its stop string came, or its token limit)."""
        tokens = tokens[:self.max_tokens]
        if len(tokens) == len(self.tokens) and not final:
            return False
        self.tokens, text = tokens, tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.ask.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.reason = text[:cut], "stop"
        elif len(tokens) >= self.max_tokens:
            self.reason = "length"
        elif final:
            self.reason = "stop"  # the model's own end of turn
        if self.reason is None:  # hold back what may still change: an unfinished UTF-8 character, a stop's start
            keep = max([len(text) - len(text.rstrip("\ufffd"))] + [len(s) - 1 for s in self.ask.stop])
            text = text[:len(text) - keep]
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit("text", text[len(self.sent):])
            self.sent = text
        elif not final:  # new tokens whose text may still change (or that have none): a chunk without text
            self.emit("text", "")
        return self.reason is not None


class Engine:
    """The loop that owns the model, in a thread of its own. A request waits in `waiting` until the decoder's
    next admission (`intake`: its media through the aligner and its run's projectors, then into a free row of the
    running batch, with its own settings in `rows`); after each admission and each call of decode steps,
    `progress` sends every running request its new text and ends the rows whose client went away, whose stop
    string came or whose own token limit is reached; `finish` answers a request whose row ended."""

    def __init__(self, runs: list[Run], decoder: GraphDecoder, rows: RowSettings, limits: Limits, metrics: Metrics):
        self.runs, self.decoder, self.rows, self.limits, self.metrics = runs, decoder, rows, limits, metrics
        llm = runs[0].model.llm
        self.context = llm.config.max_position_embeddings
        self.prompt_tokens = min(limits.prompt_tokens, self.context - 1)
        self.slots = generate.cache_slots(llm)
        self.stop_ids = tuple(sorted({t for r in runs for t in r.tokenizer.stop_ids}))
        self.pick = functools.partial(sample_rows, rows=rows)
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: dict[str, Request] = {}  # from submit to finish
        self.cond = threading.Condition()
        self.draining = self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="mmlora-engine", daemon=True)

    def submit(self, req: Request) -> None:
        with self.cond:
            if len(self.waiting) >= self.limits.waiting:
                raise ApiError(429, f"{len(self.waiting)} requests are waiting already (--max_waiting); retry "
                               "shortly", headers={"Retry-After": "1"})
            self.live[req.key] = req
            self.waiting.append(req)
            self.metrics.waiting.inc()
            self.cond.notify()

    def cancel(self, req: Request, error: ApiError | None = None) -> None:
        """End a request at the next step: its client went away (no error), or the server ends it (`error`)."""
        req.error = req.error or error
        req.gone = req.gone or error is None

    def loop(self) -> None:
        with torch.no_grad(), generate.half_precision(self.runs[0].model):
            try:  # requests that come meanwhile wait; should a recording fail, each is recorded at its first call
                self.decoder.record_for_serving(len(self.rows.run), self.slots, self.prompt_tokens,
                                                self.limits.max_tokens, self.pick, self.rows)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.waiting or self.stopping)
                    if self.stopping:
                        return
                try:
                    for finished in self.decoder.stream(
                            self.intake(), self.limits.max_tokens, self.pick, self.stop_ids, len(self.rows.run),
                            self.slots, prompt_tokens=self.prompt_tokens, progress=self.progress, settings=self.rows):
                        for key, tokens in finished:
                            self.finish(self.live[key], tokens)
                except Exception:  # noqa: BLE001  a fault of the engine: its requests fail, the server goes on
                    traceback.print_exc()
                    for req in [r for r in self.live.values() if r not in self.waiting]:
                        self.rows.wanted.pop(req.key, None)
                        req.error = ApiError(500, "the engine failed on this batch; see the server's log")
                        self.finish(req, req.tokens)
                self.metrics.running.set(0)
                self.metrics.slots.set(0)

    def intake(self):
        """The decoder's batches: the requests that came since the last admission ([] when none did), their
        prompts embedded (media through the aligner and each run's projectors)."""
        while True:
            with self.cond:
                taken, self.waiting = list(self.waiting), collections.deque()
            self.metrics.waiting.dec(len(taken))
            items = []
            for run in self.runs:
                reqs = [r for r in taken if r.ask.run is run]
                for r in [r for r in reqs if r.gone or r.error]:
                    self.finish(r, [])
                reqs = [r for r in reqs if not (r.gone or r.error)]
                if not reqs:
                    continue
                batch = data.collate([r.item for r in reqs], run.tokenizer.pad_id)
                prompts, embeds = run.model.prompt_inputs(batch.to(run.model.llm.lm_head.weight.device))
                for r, ids, e in zip(reqs, prompts, embeds):
                    self.rows.wanted[r.key] = (run.index, r.ask.temperature, r.ask.top_p, r.ask.seed)
                    items.append((r.key, ids, e))
                    self.metrics.prompt_tokens.inc(len(ids))
            yield items

    def progress(self, running: dict[str, list[int]]) -> set[str]:
        now, gone = time.perf_counter(), set()
        for key, tokens in running.items():
            req = self.live[key]
            if tokens and req.t_first is None:
                req.t_first = now
                self.metrics.ttft.observe(now - req.t0)
            if req.gone or req.error or req.update(tokens, req.ask.run.tokenizer, final=False):
                gone.add(key)
        R, S = next(iter(self.decoder.states), (0, 0))  # the cache's rows and length
        self.metrics.running.set(len(running) - len(gone))
        self.metrics.slots.set((len(running) - len(gone)) * S)
        self.metrics.slots_total.set(R * S)
        return gone

    def finish(self, req: Request, tokens: list[int]) -> None:
        """Answer a request whose row ended (or that ended before it had one)."""
        with self.cond:
            self.live.pop(req.key, None)
            self.cond.notify_all()
        now = time.perf_counter()
        if req.gone:
            self.metrics.requests.labels("499").inc()
        elif req.error is not None:
            self.metrics.requests.labels(str(req.error.status)).inc()
        else:
            req.update(tokens, req.ask.run.tokenizer, final=True)
        req.emit("end" if req.error is None else "error", req.reason if req.error is None else req.error)
        if req.gone or req.error is not None:
            return
        self.metrics.requests.labels("200").inc()
        self.metrics.generation_tokens.inc(len(req.tokens))
        self.metrics.e2e.observe(now - req.t0)
        if req.t_first is not None and len(req.tokens) > 1:
            self.metrics.tpot.observe((now - req.t_first) / (len(req.tokens) - 1))

    def drain(self, seconds: float) -> None:
        """Stop admitting (the HTTP layer answers 503 from now on), let the requests in flight finish for up to
        `seconds`, then end the rest with a 503 error."""
        self.draining = True
        deadline = time.monotonic() + seconds
        with self.cond:
            self.cond.wait_for(lambda: not self.live, timeout=max(0.0, deadline - time.monotonic()))
            for req in list(self.live.values()):
                self.cancel(req, ApiError(503, f"the server is shutting down; this request did not finish within "
                                          f"its {seconds:g} s drain (--drain_s)"))
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.live, timeout=10.0)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=10.0)


# ----------------------------------------------------------------------------------------------------------------
# HTTP


def build_app(engine: Engine, limits: Limits, api_key: str | None) -> FastAPI:
    """The FastAPI application: the endpoints, the key check on /v1/*, and OpenAI's error object for every
    refusal (`add_error_handlers`)."""
    app = FastAPI(title="mmlora", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app, engine.metrics)
    runs = {r.name: r for r in engine.runs}

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        if engine.draining:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": r.name, "object": "model", "created": 0, "owned_by": "mmlora"}
                                           for r in engine.runs]}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        authorize(request)
        return await chat_completion(request, engine, runs, limits)

    return app


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every refusal as OpenAI's error object, counted by its status: an ApiError, an unknown path (404) or method
    (405), and an internal error (500, its trace in the server's log)."""
    def refuse(e: ApiError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return refuse(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths (404), wrong methods (405)
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        traceback.print_exception(e)
        return refuse(ApiError(500, f"internal error ({type(e).__name__}); see the server's log"))


async def chat_completion(request: HttpRequest, engine: Engine, runs: dict[str, Run], limits: Limits):
    """POST /v1/chat/completions, its key checked: the request parsed, its prompt made and submitted to the engine;
    the answer as server-sent events (`events`) or, once complete, as one chat.completion object."""
    if engine.draining:
        raise ApiError(503, "the server is shutting down; send the request to another replica")
    ask = parse_request(await read_json_body(request, limits.body_bytes), runs, limits)
    if len(engine.waiting) >= limits.waiting:  # before the media are decoded; submit checks again
        raise ApiError(429, f"{len(engine.waiting)} requests are waiting already (--max_waiting); retry shortly",
                       headers={"Retry-After": "1"})
    item, max_tokens = await asyncio.to_thread(prompt, ask, engine, limits)
    req = Request(ask, item, max_tokens, asyncio.get_running_loop())
    engine.submit(req)
    watcher = asyncio.create_task(watch(request, req, engine))
    if ask.stream:
        return StreamingResponse(events(req, engine, watcher), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while (event := await req.events.get())[0] == "text":
            pass
    finally:
        watcher.cancel()
        if req.key in engine.live:  # the handler was cancelled: its client went away
            engine.cancel(req)
    if event[0] == "error":
        return JSONResponse(event[1].body(), event[1].status)
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": ask.run.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": req.sent}, "logprobs": None,
                         "finish_reason": req.reason}], "usage": usage(req)}


async def read_json_body(request: HttpRequest, limit: int):
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the body is larger than this server takes ({limit:,} bytes, --max_body_bytes)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the body is larger than this server takes ({limit:,} bytes, --max_body_bytes)")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the body is not JSON this server reads: it nests too deeply") from None


def prompt(ask: Ask, engine: Engine, limits: Limits) -> tuple[data.Item, int]:
    """The request's prompt (its media decoded) and its token limit; in the HTTP layer's threads."""
    run = ask.run
    item = generate.encode_prompt(ask.messages, decode_media(ask, limits), run.tokenizer, run.model, run.cfg)
    n = len(item.input_ids)
    if n > engine.prompt_tokens:
        raise ApiError(400, f"the prompt is {n} tokens, more than this server takes ({engine.prompt_tokens}, "
                       "--max_prompt_tokens and the model's context)", "messages")
    room = min(limits.max_tokens, engine.context - n)
    if ask.max_tokens is not None and ask.max_tokens > room:
        raise ApiError(400, f"the prompt is {n} tokens, so at most {room} new ones fit in the model's context of "
                       f"{engine.context}; lower max_tokens", "max_tokens")
    return item, ask.max_tokens or room


def usage(req: Request) -> dict:
    n = len(req.item.input_ids)
    return {"prompt_tokens": n, "completion_tokens": len(req.tokens), "total_tokens": n + len(req.tokens)}


async def watch(request: HttpRequest, req: Request, engine: Engine) -> None:
    """Wait for the client to go away (the server's receive channel says so); if it does before the answer is
    complete, the request's row ends at the next step."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    if req.key in engine.live:
        engine.cancel(req)


async def events(req: Request, engine: Engine, watcher: asyncio.Task):
    """The server-sent events of a streamed answer: a first chunk with the role, one per piece of text, the last
    with the finish reason (then the usage, if asked for), and `data: [DONE]`."""
    head = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.ask.run.name}
    extra = {"usage": None} if req.ask.include_usage else {}

    def chunk(delta: dict, reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await req.events.get())[0] == "text":
            yield chunk({"content": event[1]})
        if event[0] == "error":
            yield f"data: {json.dumps(event[1].body())}\n\n"
        else:
            yield chunk({}, event[1])
            if req.ask.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(req)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if req.key in engine.live:  # the response was cancelled: its client went away
            engine.cancel(req)


class Server(uvicorn.Server):
    """uvicorn's server with SIGTERM as a drain (`Engine.drain`, then the server stops and the process exits 0)
    rather than an immediate stop; Ctrl-C stops as uvicorn does."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float):
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    def handle_exit(self, sig, frame) -> None:
        if sig != signal.SIGTERM:
            return super().handle_exit(sig, frame)
        if not self.engine.draining:
            self.engine.draining = True
            threading.Thread(target=self.drain, daemon=True).start()

    def drain(self) -> None:
        self.engine.drain(self.drain_s)
        self.should_exit = True


# ----------------------------------------------------------------------------------------------------------------
# Command line


def start(args) -> tuple[Engine, FastAPI]:
    """The runs loaded, the engine's thread started and the application, from the parsed command line."""
    key = args.api_key or os.environ.get("MMLORA_API_KEY") or None
    check_bind(args.host, key, args.insecure)
    specs = run_specs(args.run)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    rows = RowSettings(args.rows or (256 if cuda else 16), torch.device("cuda" if cuda else "cpu"))
    runs = load_runs(specs, args.checkpoint, args.device, args.dtype, rows)
    # one run's adapters are merged into the base; several runs keep theirs apart, each row gathering its own
    decoder = choose_decoder(runs[0].model.llm, merge=len(runs) == 1, serving=True)
    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens, args.max_image_pixels,
                    args.max_audio_seconds, args.max_waiting)
    engine = Engine(runs, decoder, rows, limits, Metrics())
    engine.thread.start()
    return engine, build_app(engine, limits, key)


def check_bind(host: str, key: str | None, insecure: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and key is None and not insecure:
        raise ValueError(f"--host {host} is reachable from other machines and no API key is set; give --api_key KEY "
                         "(or MMLORA_API_KEY), or --insecure to serve without one")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="[NAME=]PATH",
                    help="a run or export folder; repeat for several runs of one base (a request's model picks)")
    ap.add_argument("--checkpoint", default="best", help="of run folders: best (default), latest, or a folder")
    ap.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU if there is one")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--api_key", help="the key clients send (Authorization: Bearer KEY); default: $MMLORA_API_KEY")
    ap.add_argument("--insecure", action="store_true", help="serve a non-loopback --host without a key")
    ap.add_argument("--rows", type=int, help="requests decoding together, at most (default 256 on a GPU, 16 on a "
                    "CPU; also bounded by a quarter of the GPU's free memory)")
    ap.add_argument("--max_prompt_tokens", type=int, default=Limits.prompt_tokens, help="the longest prompt, media "
                    "tokens included; it sizes each row's cache, so lower is faster")
    ap.add_argument("--max_tokens", type=int, default=Limits.max_tokens, help="the most new tokens a request gets")
    ap.add_argument("--max_body_bytes", type=int, default=Limits.body_bytes)
    ap.add_argument("--max_image_pixels", type=int, default=Limits.image_pixels)
    ap.add_argument("--max_audio_seconds", type=float, default=Limits.audio_seconds,
                    help="also at most each run's data.max_audio_windows windows")
    ap.add_argument("--max_waiting", type=int, default=Limits.waiting, help="requests waiting for a row; past it, "
                    "429 with Retry-After")
    ap.add_argument("--drain_s", type=float, default=30.0, help="on SIGTERM, how long requests in flight may finish")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        engine, app = start(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"serve.py: {e}", file=sys.stderr)
        sys.exit(2)
    names = ", ".join(r.name for r in engine.runs)
    print(f"serve.py: {names} at http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:{args.port}/)",
          file=sys.stderr, flush=True)
    Server(uvicorn.Config(app, args.host, args.port, log_level="warning"), engine, args.drain_s).run()
    engine.stop()


if __name__ == "__main__":
    main()

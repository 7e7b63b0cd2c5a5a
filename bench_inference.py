"""Benchmarks of using a trained run, run by bench.py: generation (`--generate`), `generate.py --predict` over the
demo's samples (`--grid predict`) and serve.py under concurrent streaming clients (`--grid serve`), each beside
transformers in the same run on the same GPU; `--hf_server`, --grid serve's transformers-based server.

    python bench.py --generate --peer x      # time_generation: LLM.generate, its recorded decoder, transformers
    python bench.py --grid predict           # time_prediction: generate.py --predict, each row a fresh process
    python bench.py --grid serve [--tiny]    # time_serving: 1 to 128 streaming clients, a transformers server

The model shapes (Qwen2.5-0.5B's, the seed-sized aligner) are bench.py's, passed in.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import data
import demo
import media
import generate
import build
from checkpoint import export
from config import Config, load_config
from model import LLM, LLMConfig, sample
from tokenizer import load_tokenizer
from encoders import AlignerConfig
from lora import lora_modules


# ----------------------------------------------------------------------------------------------------------------
# --generate and --grid predict: LLM.generate, generate.py --predict, beside transformers' generate


def time_generation(shape: dict, batch: int, prompt: int, new: int, peer: bool, profile: bool = False) -> list[dict]:
    """Greedy generation of `new` tokens after `prompt` random tokens per row, on an LLM of `shape` (Qwen2's keys;
    random bf16 weights): LLM.generate as it is, with generate.py's recorded decoder (--compile: 8 steps per CUDA graph,
    and 1 to show what recording several steps brings), and transformers' generate on the same weights. Each is
    run once untimed (compilation, recording), then timed. Tokens/s counts new tokens; `bandwidth` is the share of
    the memory-bandwidth limit at which the weights are read once per step (4.8 TB/s). `gpu_ms_per_step` is one
    recorded graph's replay alone, timed on the GPU, per step: the floor the host's overhead sits on. `profile`
    prints the kernels of 8 decode steps run through the compiled step without recording them."""
    import decode

    torch.manual_seed(0)
    with torch.device("cuda"):
        llm = LLM(LLMConfig(**shape)).init_weights().to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    prompts = torch.randint(0, 150000, (batch, prompt)).tolist()
    decoders = {}

    def decoder(steps: int) -> decode.GraphDecoder:  # made after the plain rows ran: it prepares the model
        if steps not in decoders:
            decoders[steps] = decode.GraphDecoder(llm, steps)
        return decoders[steps]
    runs = {"mmlora": lambda: llm.generate(prompts, new),
            "mmlora --compile": lambda: llm.generate(prompts, new, decoder=decoder(8)),
            "mmlora --compile, 1 step a graph": lambda: llm.generate(prompts, new, decoder=decoder(1))}
    if peer:
        runs["transformers generate"] = hf_generate(llm, shape, prompts, new)
    rows = []
    for name, fn in runs.items():
        with torch.no_grad():
            fn()  # compiles and records what it will
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tps = batch * new / dt
        rows.append({"impl": name, "batch": batch, "prompt": prompt, "new_tokens": new, "s": round(dt, 3),
                     "tokens_per_s": round(tps, 1), "ms_per_step": round(dt / new * 1e3, 3),
                     "bandwidth": round(weight_bytes * (tps / batch) / 4.8e12, 3)})
        if name.startswith("mmlora --compile"):
            rows[-1]["gpu_ms_per_step"] = replay_ms(decoders[8 if name == "mmlora --compile" else 1], prompt)
        print(json.dumps(rows[-1]), flush=True)
    if profile:
        profile_decode(decoders[8], prompt)
    return rows


def hf_generate(llm: LLM, shape: dict, prompts: list[list[int]], new: int):
    """transformers' Qwen2 with `llm`'s weights: a function that greedily generates `new` tokens after `prompts`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hf_shape = {k: v for k, v in shape.items() if k not in ("architecture", "qkv_bias")}
    hf = Qwen2ForCausalLM(Qwen2Config(**hf_shape)).to(device="cuda", dtype=torch.bfloat16).eval()
    missing, unexpected = hf.load_state_dict(llm.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.tensor(prompts, device="cuda")
    return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=0)


def replay_ms(decoder, prompt: int, times: int = 20) -> float:
    """A recorded graph of `decoder` replayed alone `times` times, timed on the GPU: milliseconds per decode step."""
    graph, slot = next(iter(decoder.graphs.values())), next(iter(decoder.states.values())).slot
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(times):
        slot.fill_(prompt)  # stay inside the cache
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / (times * decoder.steps), 3)


def profile_decode(decoder, prompt: int) -> None:
    """Print the kernels of `decoder.steps` decode steps run through its compiled step without recording them."""
    from torch.profiler import ProfilerActivity
    state = next(iter(decoder.states.values()))
    state.slot.fill_(prompt)  # stay inside the cache
    pick = functools.partial(sample, temperature=0.0, top_k=0, top_p=1.0, generator=None)
    with torch.no_grad(), torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.run(state, pick)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


def time_prediction(args, shape: dict, aligner_config: AlignerConfig, device: str = "cuda", n_val: int = 2000,
                    root: str = "/tmp/mmlora-predict") -> list[dict]:
    """`--grid predict`: the path a user runs after training, `generate.py --predict` over 2,000 demo samples
    (images, clips, text; prompts of different lengths) with --max_new_tokens 32, each row a fresh process as the
    user starts it, on the demo made with a random Qwen2.5-0.5B-shaped LLM and exported with untrained adapters
    (nothing is trained: the export's merged/ is the base). Rows: generate.py of an earlier commit
    (`--old DIR`, a checkout of it), the default (eager decode steps recorded as CUDA graphs), --compile, --eager,
    and transformers' batched `generate` on merged/ over the text-only samples, beside our default on those (the
    default runs twice: first in the machine's first process after the export, then as the reported row). Each
    row gives samples/s from its first batch on (model load and dataset reading apart), the first answer's time,
    and the process's wall time; `gpu_share` is the GPU's kernel time over the wall time of the default's answering,
    profiled in this process; `same_answers` counts the answers equal to the first row's."""
    import subprocess

    root = Path(root)
    assets, export_dir = root / "assets", root / "export"
    cfg = demo_config(assets, n_val, LLMConfig(**shape), aligner_config, "configs/qwen2.5-0.5b.toml")
    val = assets / "data" / "val.jsonl"
    text_only = root / "val_text.jsonl"
    text_only.write_text("".join(x + "\n" for x in val.read_text().splitlines()
                                 if '"image"' not in x and '"audio"' not in x))
    export_once(cfg, export_dir, device)
    rows = []
    run = functools.partial(predict_row, root, rows)
    if args.old:  # an earlier checkout's generate.py
        old = old_export(root, export_dir)
        rows.append(run("before (batch 32, eager)", str(Path(args.old) / "generate.py"), val, old))
    # the first process after the export pays for the GPU driver's cold caches and the files' first reads; the
    # rows after it see a machine as a user's second run does
    rows.append(run("default, first process", "generate.py", val, export_dir))
    rows.append(run("default (recorded eager steps)", "generate.py", val, export_dir))
    rows.append(run("--batch_size 256", "generate.py", val, export_dir, "--batch_size", "256"))
    rows.append(run("--batch_size 1024", "generate.py", val, export_dir, "--batch_size", "1024"))
    rows.append(run("--compile", "generate.py", val, export_dir, "--compile"))
    rows.append(run("--eager", "generate.py", val, export_dir, "--eager"))
    rows.append(run("default, text only", "generate.py", text_only, export_dir))
    rows.append(hf_generate_row(export_dir / "merged", text_only, cfg, device))
    rows.append(profiled_share(export_dir, val, root))
    for start in (1, 2):  # one question, cold and with the disk cache warm
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "generate.py", "--run", str(export_dir), "--max_new_tokens", "8",
                            "What is two plus three?"], capture_output=True, text=True)
        rows.append({"impl": "one question", "start": start, "wall_s": round(time.perf_counter() - t0, 2),
                     "rc": r.returncode, **({"error": r.stderr[-400:]} if r.returncode else {})})
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r.pop("answers", None)
    return rows


def demo_config(assets: Path, n_val: int, llm_config: LLMConfig | None, aligner_config: AlignerConfig | None,
                config: str) -> Config:
    """The demo's assets in `assets`, made once with a random LLM of `llm_config` and an aligner of `aligner_config`
    (None: the demo's tiny ones), and `config` pointed at them."""
    if not (assets / "READY").is_file():
        demo.make_demo(assets, n_train=64, n_val=n_val, pretrain_steps=0, llm_config=llm_config,
                       aligner_config=aligner_config, log=print)
    return load_config(config, [f"--model.llm={assets}/llm", "--model.chat_format=chatml",
                                f"--model.aligner={assets}/aligner-init", "--data.max_len=512"])


def export_once(cfg: Config, folder: Path, device: str, seed: int | None = None) -> None:
    """The model `cfg` builds, exported to `folder` unless it is there: untrained, or with `seed`, LoRA B drawn at
    random (adapters of its own, so that exports answer apart)."""
    if (folder / "mmlora.json").is_file():
        return
    _, mm = build.build_model(cfg, torch.device(device))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for m in lora_modules(mm.llm).values():
            m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
    export(mm, folder, cfg)


def old_export(root: Path, export_dir: Path) -> Path:
    """A copy of the export for an earlier checkout, which reads an export whose config holds only the keys it
    knows."""
    old = root / "export-old"
    if not old.is_dir():
        shutil.copytree(export_dir, old)
        doc = json.loads((old / "mmlora.json").read_text())
        for key in ("quantize", "quant_block", "double_quant"):
            doc["config"]["model"].pop(key, None)
        (old / "mmlora.json").write_text(json.dumps(doc))
    return old


def predict_row(root: Path, earlier: list[dict], name: str, script: str, data_file: Path, run_dir: Path,
                *flags: str) -> dict:
    """`script` (generate.py, or an earlier checkout's) --predict on `data_file` in a process of its own, 32 new
    tokens: its wall time, its timing, and how many answers equal those of the first of the `earlier` rows on the
    same file."""
    import subprocess

    out = root / f"{name.replace(' ', '_').replace('-', '')}.jsonl"
    cmd = [sys.executable, script, "--run", str(run_dir), "--predict", str(data_file), "--out", str(out),
           "--max_new_tokens", "32", *flags]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    row = {"impl": name, "data": data_file.name, "wall_s": round(time.perf_counter() - t0, 2), "rc": r.returncode}
    if r.returncode != 0:
        return {**row, "error": r.stderr[-600:]}
    timing = json.loads(out.with_name(out.stem + ".metrics.json").read_text()).get("timing")
    if timing:
        row |= timing
    else:  # the older path: its last progress line gives samples/s from its first batch on
        last = [x for x in r.stderr.splitlines() if "samples/s" in x][-1]
        row["samples_per_s"] = float(last.split("|")[1].split()[0])
        row["samples"] = int(last.split("/")[0])
    answers = {x["id"]: x["prediction"] for x in map(json.loads, out.read_text().splitlines())}
    base = next((e["answers"] for e in earlier if e["data"] == data_file.name and "answers" in e), None)
    row["same_answers"] = None if base is None else sum(answers.get(k) == v for k, v in base.items())
    print(json.dumps(row), flush=True)
    return {**row, "answers": answers}


def hf_generate_row(merged: Path, data_file: Path, cfg, device: str) -> dict:
    """transformers' batched greedy `generate` (bf16, sdpa, batches of 64 left-padded prompts sorted by length,
    32 new tokens, stopping at the end of turn) over the same prompts our predictions answer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(merged, "chatml")
    aligner = AlignerConfig.from_dict(json.loads((merged.parent / "aligner" / "aligner.json").read_text()))
    ds = data.ConversationDataset(data_file, tokenizer, aligner, cfg.model.tokens_per_media, 512)
    prompts = sorted((ds.prompt(i)[0].input_ids for i in range(len(ds))), key=len)
    hf = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.bfloat16).to(device).eval()
    t0, first = time.perf_counter(), None
    with torch.no_grad():
        for s in range(0, len(prompts), 64):
            chunk = prompts[s:s + 64]
            P = max(map(len, chunk))
            ids = torch.tensor([[tokenizer.pad_id] * (P - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk], device=device)
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                        eos_token_id=list(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id).tolist()
            first = first or time.perf_counter() - t0
    dt = time.perf_counter() - t0
    row = {"impl": "transformers generate (merged/)", "data": data_file.name, "samples": len(prompts),
           "seconds": round(dt, 2), "samples_per_s": round(len(prompts) / dt, 1), "first_answer_s": round(first, 3)}
    print(json.dumps(row), flush=True)
    del hf
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------------------------
# --grid serve: serve.py under concurrent streaming clients, beside a transformers-based server and --predict


def time_serving(args, shape: dict, aligner_config: AlignerConfig, root: str = "/tmp/mmlora-serve",
                 port: int = 8771) -> list[dict]:
    """`--grid serve`: serve.py on the demo with a random LLM of `shape` and `aligner_config` (as `--grid predict`),
    four exports of it with different random adapters, driven by N concurrent streaming clients (1, 8, 32, 128) sending
    the demo's validation questions (text, image, audio and both, in the file's order) for 32 greedy new tokens each
    (random weights run every answer to its limit). Rows: requests/s, output tokens/s, time to first token and per
    output token (p50, p99, from the client's side), errors. Beside them, in the same run: a transformers-based
    server (`hf_server`: the merged model, transformers' generate, one request at a time; 16 requests a row,
    about 30 s each), `generate.py --predict`'s offline samples/s on the same samples (all of the 128-client
    row's), and serve.py with the four runs on one base at 32 clients, requests spread over the runs. `--tiny`: the
    demo's tiny LLM and aligner on the CPU, 256 rows, a few requests a row (a smoke run of this code), or with
    `args.clients` more clients and 4 requests a client (the server's host side)."""
    tiny = getattr(args, "tiny", False)
    device, clients = ("cpu", (1, 2, 4)) if tiny else ("cuda", (1, 8, 32, 128))
    clients = getattr(args, "clients", None) or clients
    per_row = 8 if tiny and max(clients) <= 4 else None  # a smoke run's requests a row
    mid = clients[-2] if len(clients) > 1 else clients[0]  # the four runs' row and the comparisons' clients (32)
    root = Path(root + ("-tiny" if tiny else ""))
    assets = root / "assets"
    cfg = demo_config(assets, 64 if tiny else 2000, None if tiny else LLMConfig(**shape),
                      None if tiny else aligner_config, "configs/demo.toml" if tiny else "configs/qwen2.5-0.5b.toml")
    exports = [root / f"export-{i}" for i in range(4)]
    for i, folder in enumerate(exports):
        export_once(cfg, folder, device, seed=i)
    val = assets / "data" / "val.jsonl"
    samples = [json.loads(x) for x in val.read_text().splitlines()]
    bodies = [chat_request(x, val.parent) for x in samples]
    common = ["--max_prompt_tokens", "512", "--max_tokens", "32", "--max_waiting", "100000", "--port", str(port)]
    # on a CPU the cache holds 65,536 slots: prompts of at most 128 tokens leave room for 256 rows
    common += ["--device", "cpu", "--rows", "256", "--max_prompt_tokens", "128"] if tiny else []
    url, rows, warm = f"http://127.0.0.1:{port}", [], 4 if tiny else 64  # warm-up: the graphs' recordings

    def measure(impl: str, n: int, count: int, models: list[str]) -> dict:
        requests = [{**bodies[i % len(bodies)], "model": models[i % len(models)]} for i in range(count)]
        row = {"impl": impl, "clients": n, **drive(url, requests, n)}
        print(json.dumps(row), flush=True)
        return row

    with server_process([sys.executable, "serve.py", "--run", f"m={exports[0]}", *common], url, root / "serve.log"):
        measure("warm-up", 8, warm, ["m"])
        for n in clients:
            count = per_row or (max(64, 4 * n) if tiny else min(len(bodies), max(64, 16 * n)))
            rows.append(measure("serve.py", n, count, ["m"]))
    with server_process([sys.executable, "serve.py", *[f"--run=r{i}={e}" for i, e in enumerate(exports)], *common],
                        url, root / "serve-4.log"):
        measure("warm-up", 8, warm, ["r0", "r1", "r2", "r3"])
        rows.append(measure("serve.py, 4 runs of one base", mid, 512 if not tiny else 8, ["r0", "r1", "r2", "r3"]))
    with server_process([sys.executable, "bench.py", "--hf_server", str(exports[0]), "--port", str(port), "--device",
                         device], url, root / "hf.log"):
        measure("warm-up", 1, 2, ["hf"])
        for n in clients:
            rows.append(measure("transformers server (one request at a time)", n, 16 if not tiny else 4, ["hf"]))
    count = min(len(bodies), 16 * clients[-1]) if not tiny else 8
    rows.append(offline_row(root, val, samples[:count], exports[0], tiny))
    say_serving_ratios(rows, mid, clients[-1])
    return rows


def offline_row(root: Path, val: Path, samples: list[dict], export_dir: Path, cpu: bool) -> dict:
    """`generate.py --predict` on `samples` (written beside val.jsonl: their media paths are relative to it), 32
    new tokens: its timing."""
    import subprocess

    pred, subset = root / "pred.jsonl", val.with_name(f"samples-{len(samples)}.jsonl")
    subset.write_text("".join(json.dumps(x) + "\n" for x in samples))
    r = subprocess.run([sys.executable, "generate.py", "--run", str(export_dir), "--predict", str(subset.resolve()),
                        "--out", str(pred), "--max_new_tokens", "32", *(["--device", "cpu"] if cpu else [])],
                       capture_output=True, text=True)
    timing = json.loads(pred.with_name(pred.stem + ".metrics.json").read_text())["timing"] if r.returncode == 0 else {}
    row = {"impl": "generate.py --predict (offline)", "samples": len(samples), "rc": r.returncode, **timing,
           **({"error": r.stderr[-600:]} if r.returncode else {})}
    print(json.dumps(row), flush=True)
    return row


def say_serving_ratios(rows: list[dict], mid: int, most: int) -> None:
    """serve.py beside the transformers server and beside itself serving four runs at `mid` clients, and at `most`
    clients beside --predict's offline samples/s (the last row)."""
    by = {(r["impl"], r.get("clients")): r for r in rows}
    ours, four = by["serve.py", mid], by["serve.py, 4 runs of one base", mid]
    peer, busiest = by["transformers server (one request at a time)", mid], by["serve.py", most]

    def ratio(a, b):
        return a / b if a and b else float("nan")
    tokens = ratio(four["output_tokens_per_s"], ours["output_tokens_per_s"])
    print(f"at {mid} clients: {ratio(ours['requests_per_s'], peer['requests_per_s']):.1f}x the transformers "
          f"server's requests/s; four runs of one base: {tokens:.0%} of one run's tokens/s; at {most} clients: "
          f"{ratio(busiest['requests_per_s'], rows[-1].get('samples_per_s')):.0%} of --predict's samples/s",
          flush=True)


def chat_request(sample: dict, folder: Path) -> dict:
    """A demo sample's question as an OpenAI chat request: its image as a PNG data: URL, its clip as base64 WAV
    (both before the text), 32 greedy new tokens, streamed with the usage at the end."""
    import base64
    import io

    from PIL import Image
    parts = []
    for path in data.media_paths(sample, "image"):
        buf = io.BytesIO()
        Image.fromarray(media.load_image(folder / path).permute(1, 2, 0).numpy()).save(buf, format="PNG")
        parts.append({"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    for path in data.media_paths(sample, "audio"):
        parts.append({"type": "input_audio", "input_audio": {
            "data": base64.b64encode((folder / path).read_bytes()).decode(), "format": "wav"}})
    question = sample["conversations"][0]["value"]
    for placeholder in data.PLACEHOLDERS.values():
        question = question.replace(placeholder + "\n", "").replace(placeholder, "")
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
            "max_tokens": 32, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


def drive(url: str, requests: list[dict], clients: int) -> dict:
    """`clients` concurrent streaming clients sending `requests` until none is left: requests/s, output tokens/s
    (each answer's usage), time to first token (the first chunk after the role's) and per output token after it
    (p50, p99, in ms), errors."""
    import asyncio

    import httpx
    import numpy as np

    todo, done = list(reversed(requests)), []

    async def client(http) -> None:
        while todo:
            body, t0, first, tokens, ok = todo.pop(), time.perf_counter(), None, 0, False
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        doc = json.loads(line[6:])
                        if doc.get("usage"):
                            tokens, ok = doc["usage"]["completion_tokens"], r.status_code == 200
                        elif first is None and doc.get("choices") and "role" not in doc["choices"][0]["delta"]:
                            first = time.perf_counter()
            except httpx.HTTPError:
                pass
            done.append((ok, t0, first, time.perf_counter(), tokens))

    async def run() -> float:
        # a connection pool for each client: one shared pool of N connections costs its client O(N) bookkeeping
        # per request event (httpcore assigns requests to connections by a scan), which at 128 clients made the
        # driver, not the server, set the pace
        https = [httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1)) for _ in range(clients)]
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for http in https))
        wall = time.perf_counter() - t0
        for http in https:
            await http.aclose()
        return wall
    wall = asyncio.run(run())
    good = [d for d in done if d[0] and d[2] is not None]
    ttft = [1e3 * (first - t0) for _, t0, first, _, _ in good]
    tpot = [1e3 * (end - first) / (n - 1) for _, _, first, end, n in good if n > 1]

    def pct(x, q):
        return round(float(np.percentile(x, q)), 2) if x else None
    return {"requests": len(done), "errors": len(done) - len(good), "seconds": round(wall, 2),
            "requests_per_s": round(len(good) / wall, 2),
            "output_tokens_per_s": round(sum(d[4] for d in good) / wall, 1),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99)}


class server_process:
    """A server started as a process of its own (its output to `log`), ready once GET /health answers 200; SIGTERM
    at the end (serve.py drains, then exits)."""

    def __init__(self, cmd: list[str], url: str, log: Path):
        self.cmd, self.url, self.log = cmd, url, log

    def __enter__(self):
        import subprocess

        import httpx
        self.out = open(self.log, "w")
        self.p = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT)
        for _ in range(6000):
            if self.p.poll() is not None:
                raise RuntimeError(f"{' '.join(self.cmd)} exited: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{' '.join(self.cmd)} did not answer /health in 10 minutes")

    def __exit__(self, *exc):
        self.p.terminate()
        self.p.wait(120)
        self.out.close()


def hf_server(export_dir: str, port: int, device: str) -> None:
    """`--hf_server`: `--grid serve`'s baseline, a server as LLaMA-Factory's transformers backend and LLaVA's model
    worker answer: transformers' `generate` on the export's merged/ model, greedy, one request at a time, streamed
    (a chunk per token). The prompt and its media embeddings are serve.py's (its request parsing, our aligner and
    projectors), handed to generate as inputs_embeds."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import serve
    run = serve.load_runs([("hf", Path(export_dir))], "best", device, None, None)[0]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(Path(export_dir) / "merged", torch_dtype=dtype).to(device).eval()
    limits = serve.Limits(prompt_tokens=512, max_tokens=32)
    shape = SimpleNamespace(prompt_tokens=512, context=run.model.llm.config.max_position_embeddings)
    one_at_a_time = threading.Lock()
    app = FastAPI()

    class Tokens(BaseStreamer):  # generate's new tokens, counted into the request's queue (None at the end)
        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt = loop, queue, True

        def put(self, value):
            if not self.prompt:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, value.numel())
            self.prompt = False

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def answer(item, n: int, streamer: Tokens) -> None:
        with one_at_a_time, torch.no_grad(), generate.half_precision(run.model):
            _, embeds = run.model.prompt_inputs(data.collate([item], run.tokenizer.pad_id).to(device))
            x = embeds[0][None].to(dtype)
            hf.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=device),
                        max_new_tokens=n, do_sample=False, eos_token_id=list(run.tokenizer.stop_ids),
                        pad_token_id=run.tokenizer.pad_id, streamer=streamer)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def chat(request):  # a Starlette route: `request` is the request itself
        try:
            ask = serve.parse_request(await request.json(), {"hf": run}, limits)
            item, n = await asyncio.to_thread(serve.prompt, ask, shape, limits)
        except serve.ApiError as e:
            return JSONResponse(e.body(), e.status)
        queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=answer, args=(item, n, Tokens(asyncio.get_running_loop(), queue)), daemon=True).start()
        return StreamingResponse(token_events(queue, len(item.input_ids)), media_type="text/event-stream")
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def token_events(queue, prompt_tokens: int):
    """`hf_server`'s stream of one answer: the role, an empty chunk per token counted off `queue` (None at the end),
    then the usage."""
    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
    tokens = 0
    while (got := await queue.get()) is not None:
        tokens += got
        yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': ''}}]})}\n\n"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}
    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"


class PhaseTimer:
    """Seconds per phase of `generate.predict`, with a sync at the end of each phase (so the phases do not overlap):
    the wait for the loader's next batch, the aligner (`embed`), the prompts' passes (`GraphDecoder.admit`) and the
    decode calls (the graphs' recordings and replays: `GraphDecoder.advance`)."""

    def __init__(self, model, decoder):
        self.seconds: dict[str, float] = {}
        self.model, self.decoder = model, decoder

    def timed(self, name: str, fn):
        def run(*args, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    def batches(self, *args, **kw):  # data.prompt_batches, each wait for the next batch timed
        it = self.real_batches(*args, **kw)
        while True:
            sync()
            t0 = time.perf_counter()
            item = next(it, None)
            self.seconds["loader wait"] = self.seconds.get("loader wait", 0.0) + time.perf_counter() - t0
            if item is None:
                return
            yield item

    def predict(self, *args, **kw) -> dict:
        """generate.predict(*args, **kw), its phases timed: the timing with "phases" added."""
        self.seconds, self.real_batches = {}, data.prompt_batches
        self.model.embed, data.prompt_batches = self.timed("aligner", self.model.embed), self.batches
        self.decoder.admit = self.timed("prompts' passes", self.decoder.admit)
        self.decoder.advance = self.timed("decode calls", self.decoder.advance)
        try:
            metrics = generate.predict(*args, **kw)
        finally:
            data.prompt_batches = self.real_batches
            for obj, name in ((self.model, "embed"), (self.decoder, "admit"), (self.decoder, "advance")):
                del obj.__dict__[name]  # the method again
        return {**metrics["timing"], "phases": {k: round(v, 3) for k, v in self.seconds.items()}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled_share(export_dir: Path, data_file: Path, root: Path, rows: int = 512) -> dict:
    """The default prediction path in this process: a first pass timed by phase (`PhaseTimer`), a second under
    torch.profiler (the GPU's kernel time over the wall time of answering), a third timed by phase again."""
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, cfg = generate.load_run(export_dir)
    args = argparse.Namespace(compile=False, eager=False, predict=True, seed=0)
    sampling = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, **generate.decoding(model.llm, args)}
    out = root / "profiled.jsonl"
    timer = PhaseTimer(model, sampling["decoder"])
    first = timer.predict(model, tokenizer, cfg, str(data_file), out, rows, 32, sampling, False, workers=8)
    print(json.dumps({"impl": "default, in process, first pass by phase", **first}), flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        metrics = generate.predict(model, tokenizer, cfg, str(data_file), out, rows, 32, sampling, False, workers=8)
    later = timer.predict(model, tokenizer, cfg, str(data_file), out, rows, 32, sampling, False, workers=8)
    print(json.dumps({"impl": "default, in process, third pass by phase", **later}), flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    t = metrics["timing"]
    row = {"impl": "default, profiled in process (second pass)", "samples_per_s": t["samples_per_s"],
           "seconds": t["seconds"], "gpu_kernel_s": round(kernels, 3), "gpu_share": round(kernels / t["seconds"], 3),
           "first_pass": first, "third_pass": later}
    print(json.dumps(row), flush=True)
    return row

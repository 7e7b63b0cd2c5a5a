"""serve.py: the official openai client gets generate.py's greedy answers (text, image, audio, two turns, streamed
and not), concurrent clients get what each gets alone, a client that goes away frees its row, two runs of one base
decode in one batch with their own adapters, every limit and refusal is a 4xx JSON error after which the server
still answers, the API key, SIGTERM's drain, and the chat page in a real headless Chromium."""
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

import generate
import serve

KEY = "test-key"
FLAGS = ["--max_tokens", "200", "--max_prompt_tokens", "200", "--rows", "16", "--max_image_pixels", "40000",
         "--max_body_bytes", "300000"]


def derived_run(trained_run: Path, out: Path, seed: int) -> Path:
    """A copy of the trained run with random LoRA B matrices and shifted projectors: answers long enough to stream
    and interrupt, and different for each seed (the short run itself answers with its end of turn at once)."""
    (out / "checkpoints" / "best").mkdir(parents=True)
    shutil.copy(trained_run / "config.json", out / "config.json")
    src = trained_run / "checkpoints" / "best"
    shutil.copy(src / "state.json", out / "checkpoints" / "best" / "state.json")
    tensors = load_file(str(src / "trainable.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k, v in tensors.items():
        noise = torch.randn(v.shape, generator=g)
        tensors[k] = noise * 0.2 if "lora_B" in k else v + noise * 0.05
    save_file(tensors, str(out / "checkpoints" / "best" / "trainable.safetensors"))
    return out


@pytest.fixture(scope="module")
def runs(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_runs")
    return {name: derived_run(Path(trained_run), root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(demo_dir, tmp_path_factory):
    """The demo's first validation image as a PNG and its first clip as a WAV, as files and as API parts."""
    folder = tmp_path_factory.mktemp("serve_media")
    root = Path(demo_dir) / "data" / "media"
    image, audio = folder / "shape.png", folder / "beeps.wav"
    image.write_bytes(png(np.load(sorted(root.glob("val-*.npy"))[0])))
    shutil.copy(sorted(root.glob("val-*.wav"))[0], audio)
    return {"image": image, "audio": audio,
            "image_part": {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}},
            "audio_part": {"type": "input_audio", "input_audio": {
                "data": base64.b64encode(audio.read_bytes()).decode(), "format": "wav"}}}


@contextlib.contextmanager
def serving(*argv):
    """serve.py's engine and application in this process, uvicorn in a thread on a free port."""
    import uvicorn
    engine, app = serve.start(serve.parser().parse_args(list(map(str, argv))))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    engine.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.fixture(scope="module")
def server(runs):
    with serving("--run", f"a={runs['a']}", "--api_key", KEY, *FLAGS) as engine:
        yield engine


def client(engine, key=KEY):
    from openai import OpenAI
    return OpenAI(base_url=engine.url + "/v1", api_key=key, max_retries=0, timeout=60)


class Oracle:
    """generate.py's greedy answers for a run (its model loaded here, LoRA unmerged, LLM.generate's own steps)."""

    def __init__(self, run: Path):
        self.model, self.tokenizer, self.cfg = generate.load_run(run)

    def __call__(self, turns: list[tuple[str, str, list[str]]], media_files: dict, max_new_tokens: int) -> str:
        """turns: (role, text, attached media kinds); a turn's media go first, in the order given (as the API
        request's parts)."""
        messages, media = [], []
        for role, text, kinds in turns:
            attached = [(k, str(media_files[k])) for k in kinds]
            placed = "".join(f"<{k}>\n" for k in kinds) + text
            messages.append({"role": role, "content": generate.user_turn(placed, attached)})
            media += attached
        item = generate.prompt_item(messages, media, self.tokenizer, self.model, self.cfg, max_new_tokens)
        return generate.answer(self.model, self.tokenizer, item, max_new_tokens, {})


@pytest.fixture(scope="module")
def oracle(runs):
    return {name: Oracle(path) for name, path in runs.items()}


def api_messages(turns, media):
    return [{"role": role, "content": [media[f"{k}_part"] for k in kinds] + [{"type": "text", "text": text}]
             if kinds else text} for role, text, kinds in turns]


CONVERSATIONS = {
    "text": [("user", "What colour is the shape?", [])],
    "image": [("user", "What shape is in the image?", ["image"])],
    "audio": [("user", "How many beeps?", ["audio"])],
    "two turns": [("user", "What shape is in the image?", ["image"]), ("assistant", "a red circle", []),
                  ("user", "And its colour?", [])],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_openai_client_gets_generate_pys_greedy_answers(server, oracle, media, name):
    turns, n = CONVERSATIONS[name], 40
    expected = oracle["a"](turns, media, n)
    c = client(server)
    r = c.chat.completions.create(model="a", messages=api_messages(turns, media), temperature=0, max_tokens=n)
    assert r.choices[0].message.content == expected and expected
    reason = "length" if r.usage.completion_tokens == n else "stop"
    assert r.choices[0].finish_reason == reason and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="a", messages=api_messages(turns, media), temperature=0,
                                            max_completion_tokens=n, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected and sum(bool(ch.choices and ch.choices[0].delta.content) for ch in chunks) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def test_sixteen_clients_at_once_get_what_each_gets_alone(server, oracle, media):
    """Greedy requests of every mix, and two sampled ones (their own seed, temperature and top-p), sent at once:
    each greedy answer is generate.py's, each sampled one what the same request gets alone afterwards; rows of
    several requests decoded together."""
    questions = ["What colour is the shape?", "How many beeps?", "Is the tone high or low?", "Hello"]
    kinds = [[], ["image"], ["audio"], ["image", "audio"]]
    cases = [[("user", questions[i % 4], kinds[i // 4])] for i in range(14)]
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
    running, progress = [], server.progress
    server.progress = lambda rows: running.append(len(rows)) or progress(rows)
    c = client(server)

    def ask(i):
        turns = cases[i] if i < 14 else CONVERSATIONS["image"]
        settings = sampled if i >= 14 else {"temperature": 0}
        return c.chat.completions.create(model="a", messages=api_messages(turns, media), max_tokens=24,
                                         stream=i % 2 == 0, **settings)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
    finally:
        del server.progress
    texts = ["".join(ch.choices[0].delta.content or "" for ch in a if ch.choices) if i % 2 == 0 else
             a.choices[0].message.content for i, a in enumerate(answers)]
    assert texts[:14] == [oracle["a"](turns, media, 24) for turns in cases]
    alone = ask(15)
    assert texts[14] == texts[15] == alone.choices[0].message.content != oracle["a"](CONVERSATIONS["image"], media, 24)
    assert max(running) > 4


def metric(engine, name: str) -> float:
    lines = httpx.get(engine.url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name + " ") or x.startswith(name + "{"))


def test_a_client_that_goes_away_frees_its_row(server, media):
    """A streaming client leaves after the first piece of its answer (the engine held after the step that sent it
    until the server has seen the client go, so that the answer cannot end first): its row ends at the next step,
    the slots in use return to 0, it counts as 499, and the next request is answered."""
    gone = metric(server, 'mmlora_requests_total{status="499"}')
    held, progress = threading.Event(), server.progress
    server.progress = lambda rows: [progress(rows), any(server.live[k].sent for k in rows) and held.wait(10)][0]
    body = {"model": "a", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first piece of the answer: then the client leaves
            assert metric(server, "mmlora_cache_slots_in_use") > 0
        for _ in range(1000):
            if any(req.gone for req in list(server.live.values())):
                break
            time.sleep(0.005)
    finally:
        held.set()
        del server.progress
    for _ in range(1000):
        if not server.live:
            break
        time.sleep(0.005)
    assert metric(server, "mmlora_cache_slots_in_use") == 0 and not server.live
    assert metric(server, 'mmlora_requests_total{status="499"}') == gone + 1
    assert client(server).chat.completions.create(model="a", messages=body["messages"], max_tokens=2).choices


def test_two_runs_of_one_base_decode_in_one_batch_with_their_own_adapters(runs, oracle, media, tmp_path):
    """Requests for runs a and b at once on one server: each gets its own run's answer (generate.py's on that run
    alone); a's and b's differ, and rows of both ran in one batch. A run of another base or aligner is refused at
    start, naming both paths."""
    with serving("--run", f"a={runs['a']}", "--run", f"b={runs['b']}", *FLAGS) as engine:
        together, progress = [], engine.progress
        engine.progress = lambda rows: together.append({engine.live[k].ask.run.name for k in rows}) or progress(rows)
        c = client(engine, "none")
        jobs = [(name, turns) for turns in (CONVERSATIONS["text"], CONVERSATIONS["image"]) for name in "ab"] * 2
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: c.chat.completions.create(
                model=job[0], messages=api_messages(job[1], media), temperature=0, max_tokens=24)
                .choices[0].message.content, jobs))
        expected = [oracle[name](turns, media, 24) for name, turns in jobs]
        assert got == expected and expected[0] != expected[1] and expected[2] != expected[3]
        assert {"a", "b"} in together
    other = derived_run(runs["a"], tmp_path / "c", 3)
    cfg = json.loads((other / "config.json").read_text())
    aligner = tmp_path / "aligner"
    shutil.copytree(cfg["model"]["aligner"], aligner)
    tensors = load_file(str(aligner / "aligner.safetensors"))
    save_file({k: v + 1 for k, v in tensors.items()}, str(aligner / "aligner.safetensors"))
    for key, value in (("aligner", str(aligner)), ("llm", str(tmp_path / "llm"))):
        if key == "llm":
            shutil.copytree(cfg["model"]["llm"], tmp_path / "llm")
        (other / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], key: value}}))
        with pytest.raises(ValueError) as e:
            serve.load_runs([("a", runs["a"]), ("c", other)], "best", "cpu", None, serve.RowSettings(4, "cpu"))
        assert str(other) in str(e.value) and value in str(e.value) and cfg["model"][key] in str(e.value)


def test_every_limit_and_refusal_is_a_json_error_and_the_server_goes_on(server, media):
    from PIL import Image  # noqa: F401  (the large image below)
    text = [{"role": "user", "content": "Hi"}]

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def image(url):
        return {"type": "image_url", "image_url": {"url": url}}
    big = "data:image/png;base64," + base64.b64encode(png(np.zeros((250, 250, 3), np.uint8))).decode()
    sliver = "data:image/png;base64," + base64.b64encode(png(np.zeros((1, 300, 3), np.uint8))).decode()
    from test_faults import wav_bytes
    loud = base64.b64encode(wav_bytes(np.array([1e38, -1e38] * 800, "<f4").tobytes(), 3, 1, 32)).decode()
    long_clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(2.0)).decode(), "format": "wav"}}
    where = "messages[0].content[0]"
    cases = [  # (body, status, param)
        ({"model": "a", "messages": text, "pad": "x" * 300_000}, 413, None),
        ("{not json", 400, None),
        ({"model": "gpt-4o", "messages": text}, 404, "model"),
        ({"model": "a", "messages": text, "n": 2}, 400, "n"),
        ({"model": "a", "messages": text, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"model": "a", "messages": text, "logprobs": True}, 400, "logprobs"),
        ({"model": "a", "messages": text, "best_of": 2}, 400, "best_of"),
        ({"model": "a", "messages": user(image("https://example.com/a.png"))}, 400, f"{where}.image_url.url"),
        ({"model": "a", "messages": user(image("/etc/passwd"))}, 400, f"{where}.image_url.url"),
        ({"model": "a", "messages": user(image("file:///etc/passwd"))}, 400, f"{where}.image_url.url"),
        ({"model": "a", "messages": user(image("data:image/png;base64,@@@"))}, 400, f"{where}.image_url.url"),
        ({"model": "a", "messages": user(image("data:image/png;base64,aGVsbG8="))}, 400, f"{where}.image_url"),
        ({"model": "a", "messages": user(image(big))}, 400, f"{where}.image_url"),
        ({"model": "a", "messages": user({"type": "input_audio", "input_audio": {"data": "aGk=", "format": "mp3"}})},
         400, f"{where}.input_audio.format"),
        ({"model": "a", "messages": user(long_clip)}, 400, f"{where}.input_audio"),
        ({"model": "a", "messages": [{"role": "user", "content": "beep " * 300}]}, 400, "messages"),
        ({"model": "a", "messages": [{"role": "user", "content": "<image> what?"}]}, 400, "messages[0].content"),
        ({"model": "a", "messages": [{"role": "assistant", "content": [media["image_part"]]}]}, 400,
         f"{where}.type"),
        ({"model": "a", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "a", "messages": text, "max_tokens": 201}, 400, "max_tokens"),
        ({"model": "a", "messages": text, "temperature": 3}, 400, "temperature"),
        ({"model": "a", "messages": text, "stop": 5}, 400, "stop"),
        ({"model": "a", "messages": []}, 400, "messages"),
        # what once gave a 500, or no error at all
        ({"model": ["a"], "messages": text}, 404, "model"),
        ({"model": "a", "messages": [{"role": ["user"], "content": "x"}]}, 400, "messages[0].role"),
        ("[" * 100_000 + "]" * 100_000, 400, None),
        ('{"model": "a", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "messages[0].content"),
        ('{"model": "a", "\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', 400, "\\ud800"),
        ({"model": "a", "messages": user({"type": "text", "text": "<ima"}, {"type": "text", "text": "ge> what?"})},
         400, "messages[0].content"),
        ({"model": "a", "messages": user({"type": "text", "text": 5})}, 400, f"{where}.text"),
        ({"model": "a", "messages": user({"type": "input_audio", "input_audio": "x"})}, 400, f"{where}.input_audio"),
        ({"model": "a", "messages": user(image(sliver))}, 400, f"{where}.image_url"),
        ({"model": "a", "messages": user(image(big.replace("image/png", "text/plain")))}, 400,
         f"{where}.image_url.url"),
        ({"model": "a", "messages": user({"type": "input_audio", "input_audio": {"data": loud, "format": "wav"}})},
         400, f"{where}.input_audio"),
    ]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    c = client(server)
    for body, status, param in cases:
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                       content=body if isinstance(body, str) else json.dumps(body))
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param), (body if isinstance(body, str) else
                                                                    str(body)[:200], r.text[:300])
        assert error["message"] and error["type"]
        assert c.chat.completions.create(model="a", messages=text, max_tokens=1).choices[0].message is not None
    server.limits.waiting = 0  # every request beyond the waiting limit: 429 with Retry-After
    try:
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers, json={"model": "a", "messages": text})
    finally:
        server.limits.waiting = 512
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"]
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert metric(server, 'mmlora_requests_total{status="400"}') >= 30
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers,  # a null max_completion_tokens is absent
                   json={"model": "a", "messages": text, "max_tokens": 2, "max_completion_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_the_api_key_and_the_bind_rule(server, runs, capsys):
    from openai import AuthenticationError
    for key in ("", "wrong-key"):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(AuthenticationError):
            client(server, key or "x").chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}])
    assert [m.id for m in client(server).models.list()] == ["a"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # the probe needs no key
    with pytest.raises(SystemExit) as e:
        serve.main(["--run", str(runs["a"]), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--api_key" in err and "--insecure" in err
    serve.check_bind("0.0.0.0", "k", False)
    serve.check_bind("0.0.0.0", None, True)
    serve.check_bind("::1", None, False)


def test_sigterm_stops_admitting_drains_and_exits_0(runs):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", f"a={runs['a']}", "--port", str(port),
                          "--drain_s", "0.3", "--max_tokens", "400", "--max_prompt_tokens", "100"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert "serve.py: a at" in p.stderr.readline()
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.05)
        body = {"model": "a", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            p.send_signal(signal.SIGTERM)
            for _ in range(100):
                if httpx.get(url + "/health").status_code == 503:
                    break
            late = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False})
            events += [line for line in lines if line.startswith("data: ")]
        assert late.status_code == 503 and late.json()["error"]["message"]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert "error" in last and "drain" in last["error"]["message"] or last["choices"][0]["finish_reason"]
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_the_chat_page_streams_an_answer_in_chromium(server, oracle, media):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the chat page's browser test "
                    "needs it")
    from playwright.sync_api import sync_playwright
    expected = oracle["a"](CONVERSATIONS["image"], media, 40)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#model option[value=a]", state="attached")
            page.fill("#max_tokens", "40")
            page.set_input_files("#image", str(media["image"]))
            page.wait_for_function("document.getElementById('attached').textContent.includes('shape.png')")
            page.fill("#question", CONVERSATIONS["image"][0][1])
            page.click("#send")
            done = page.wait_for_selector(".assistant[data-done]", timeout=30_000)
            assert done.get_attribute("data-done") in ("stop", "length")
            assert done.text_content() == expected and int(done.get_attribute("data-chunks")) > 1
            assert page.locator(".user img").count() == 1
        finally:
            browser.close()

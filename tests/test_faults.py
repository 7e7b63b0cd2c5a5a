"""Faults, kills and bad input: each scenario of the README's "Fault tolerance" table, proved."""
import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from conftest import ROOT, cli_args, demo_config, torchrun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data

import media
import build
import train
from tokenizer import load_tokenizer
from encoders import load_aligner
from checkpoint import CheckpointWriteError, find_resume, load_checkpoint
from distributed import World

DRIVER = str(ROOT / "tests" / "fault_driver.py")


def loads_cleanly(cfg) -> int:
    """Resume as train.py would: the checkpoint it picks loads into a fresh model. Returns its step."""
    path = find_resume(cfg)
    assert path is not None and not path.name.startswith(".")
    _, mm = build.build_model(cfg, torch.device("cpu"))
    opt, _ = train.make_optimizer(mm, cfg.train)
    scaler, _ = train.mixed_precision(cfg.train, torch.device("cpu"))
    return load_checkpoint(path, mm, opt, scaler, World()).step


def test_kill_9_during_saves_never_corrupts_the_last_checkpoint(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 400, "save_every": 1, "keep_last": 2})
    ckpt = tmp_path / "checkpoints"
    rng = random.Random(0)
    steps = []
    for trial in range(3):
        p = subprocess.Popen([sys.executable, DRIVER, *cli_args(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={**os.environ, "FAULT": "slow_fsync", "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        start = steps[-1] if steps else 0

        def saved_past_start() -> bool:  # a checkpoint newer than the last trial's is complete
            path = find_resume(cfg)
            return path is not None and json.loads((path / "state.json").read_text())["step"] > start
        while not saved_past_start():
            assert time.time() < deadline and p.poll() is None, "the run saved no new checkpoint"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.6))
        p.kill()  # SIGKILL: no handler runs
        p.wait()
        steps.append(loads_cleanly(cfg))
    assert steps == sorted(steps) and steps[0] >= 1
    train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": steps[-1] + 1, "save_every": 1}))
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # leftovers cleaned at the next start


def test_failed_write_is_a_clear_error_and_keeps_the_previous_checkpoint(demo_dir, tmp_path, monkeypatch):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 4, "save_every": 2})
    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint is intact"):
        train.fit(cfg)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert loads_cleanly(cfg) == 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("change,message", [
    ({"lora": {"rank": 8}}, "does not fit this run"),
    ({"lora": {"targets": "q_proj,v_proj"}}, "does not fit this run"),
    ({"model": {"projector_hidden": 64}}, "does not fit this run"),
])
def test_a_checkpoint_that_does_not_fit_stops_before_training(demo_dir, tmp_path, change, message):
    train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 2}))
    files = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=message):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 4}, **change))
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == files
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # no step was taken


def test_a_checkpoint_of_another_base_model_or_truncated_is_refused(demo_dir, tmp_path):
    train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 2}))
    state_path = tmp_path / "checkpoints" / "step_0000002" / "state.json"
    state = json.loads(state_path.read_text())
    state["llm_config"]["rope_theta"] = 1.0
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"different base model \(config differs in \['rope_theta'\]\)"):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 4}))
    for folder in ("step_0000002", "best"):  # no readable checkpoint left to fall back on
        weights = tmp_path / "checkpoints" / folder / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read.*truncated"):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 4}))


def torchrun_driver(cfg, env):
    t0 = time.time()
    r = torchrun(cli_args(cfg), 2, script=DRIVER, env=env, timeout=180)
    return r, time.time() - t0


def test_one_rank_raising_stops_every_rank_without_a_hang(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 50, "batch_size": 2})
    r, took = torchrun_driver(cfg, {"FAULT": "raise", "FAULT_RANK": "1", "FAULT_CALL": "4"})
    assert r.returncode != 0 and took < 120
    assert "injected fault" in r.stderr + r.stdout
    state = json.loads((tmp_path / "checkpoints" / "emergency" / "state.json").read_text())
    assert state["step"] == 3  # rank 0 saved the last whole step alone


def test_nan_on_one_rank_skips_the_step_on_every_rank(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 50, "batch_size": 2, "max_bad_steps": 3})
    r, _ = torchrun_driver(cfg, {"FAULT": "nan", "FAULT_RANK": "1", "FAULT_CALL": "3"})
    assert r.returncode != 0 and "3 non-finite steps in a row" in r.stderr + r.stdout
    state = json.loads((tmp_path / "checkpoints" / "emergency" / "state.json").read_text())
    assert state["step"] == 2 and state["bad_steps"] == 3


def test_nan_gradient_is_skipped_and_counted(demo_dir, tmp_path, monkeypatch):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 4, "max_bad_steps": 3})
    real = train.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def nan_once(params, max_norm):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's gradient norm is NaN
            params[0].grad.view(-1)[0] = float("nan")
        return real(params, max_norm)
    monkeypatch.setattr(train.nn.utils, "clip_grad_norm_", nan_once)
    result = train.fit(cfg)
    assert result["step"] == 4 and result["bad_steps"] == 1
    # the optimizer skipped that step on the device: had AdamW applied it, its moments and weights would be NaN
    final = load_file(str(tmp_path / "checkpoints" / "step_0000004" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def dataset(path, demo_dir, **kw):
    tok = load_tokenizer(demo_dir / "llm", chat_format="chatml")
    acfg = load_aligner(demo_dir / "aligner-init").config
    return data.ConversationDataset(path, tok, acfg, {"image": 16, "audio": 8}, 128, **kw)


def test_empty_and_tiny_datasets(demo_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable samples"):
        dataset(tmp_path / "empty.jsonl", demo_dir)
    tiny = tmp_path / "tiny.jsonl"  # 3 samples, fewer than 2 ranks x batch 4: the stream wraps into new epochs
    tiny.write_text("".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": "one plus one?"},
                                                                    {"role": "assistant", "content": "two"}]}) + "\n"
                            for i in range(3)))
    result = train.fit(demo_config(demo_dir, tmp_path / "run", data={"train_file": str(tiny), "val_file": ""},
                                     train={"max_steps": 3, "batch_size": 4}))
    assert result["step"] == 3


def test_absolute_media_paths_need_permission(demo_dir, tmp_path):
    img = (demo_dir / "data" / "media").resolve() / "train-00001.npy"
    path = tmp_path / "abs.jsonl"
    path.write_text(json.dumps({"id": "a", "image": str(img), "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(data.SampleError, match="leaves the data folder"):
        dataset(path, demo_dir)
    assert len(dataset(path, demo_dir, allow_outside_paths=True)) == 1


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
TURN = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", "bot"]) | JSON,
                                           "value": st.sampled_from(["<image>\nWhat?", "<audio>", "two", ""]) | JSON,
                                           "role": st.sampled_from(["user", "assistant"]) | JSON,
                                           "content": st.text(max_size=20) | JSON})
MEDIA = {"image": st.sampled_from(["media/train-00001.npy", "../x.npy", "/etc/passwd"]) | JSON,
         "audio": st.sampled_from([["media/train-00000.wav"], "nope.wav"]) | JSON}
SAMPLE = st.fixed_dictionaries({}, optional={"id": JSON, "conversations": st.lists(TURN, max_size=4) | JSON,
                                             "messages": st.lists(TURN, max_size=4) | JSON, **MEDIA})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(SAMPLE.map(json.dumps) | JSON.map(json.dumps)
                | st.text(max_size=30).map(lambda t: t.replace("\n", " ")), max_size=5))
def test_fuzz_conversation_reader(demo_dir, tmp_path_factory, lines):
    folder = demo_dir / "data"
    path = folder / f"fuzz-{tmp_path_factory.mktemp('f').name}.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    try:
        for on_error in ("skip", "raise"):
            try:
                ds = dataset(path, demo_dir, on_error=on_error)
            except data.SampleError:
                assert on_error == "raise"
            except ValueError as e:
                assert "no usable samples" in str(e)
            else:
                assert all(x.labels.count(-100) < len(x.labels) for x in ds.examples)
                if on_error == "skip":
                    assert len(ds) + len(ds.skipped) == sum(1 for x in lines if x.strip())
    finally:
        path.unlink()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.sampled_from([".wav", ".npy", ".png", ".jpg"]))
def test_fuzz_media_decoders(tmp_path_factory, blob, suffix):
    path = tmp_path_factory.mktemp("m") / f"x{suffix}"
    path.write_bytes(blob)
    try:
        out = media.load_audio(path, 16000) if suffix in (".wav", ".npy") else media.load_image(path)
        assert out.dtype in (torch.float32, torch.uint8)
    except ValueError as e:  # the one documented error, naming the file
        assert str(path) in str(e) and "cannot decode" in str(e)

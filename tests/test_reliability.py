"""Hostile input and faults, one test per kind: each is a clear error that names what to fix, a listed skip, or
correct training, and nothing that was saved is lost."""
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, demo_config, launch_sh, rows

import data

import media
import model
import tokenizer
import encoders
import build
import train
from checkpoint import CheckpointReadError, CheckpointWriteError


def sample(sid, **media):
    """A conversation with one question per medium given (paths relative to the data file)."""
    question = "".join(f"<{m}>\n" for m in media) + "What is it?"
    return {"id": sid, **media, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]}


def dataset_file(tmp_path, demo_dir, samples, name="d.jsonl"):
    import shutil
    shutil.copytree(demo_dir / "data" / "media", tmp_path / "media", dirs_exist_ok=True)
    path = tmp_path / name
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


# -- Data loss and silent corruption --------------------------------------------------------------------------


def test_a_second_run_on_the_same_out_dir_is_refused(demo_dir, tmp_path):
    """The run folder is locked: a second run is refused with the first one's host and PID and changes nothing;
    a killed holder leaves no lock behind."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from checkpoint import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 2})
        with pytest.raises(RuntimeError, match=f"in use by another run \\(host .*, pid {holder.pid}, since"):
            train.fit(cfg)
        assert not (tmp_path / "metrics.jsonl").exists() and not any((tmp_path / "checkpoints").iterdir())
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process
        holder.wait()
    assert train.fit(cfg)["step"] == 2


def test_ctrl_c_saves_an_emergency_checkpoint_and_a_second_exits_at_once():
    before = signal.getsignal(signal.SIGINT)
    stop = train.StopRequest(lambda *a: None)
    try:
        stop.handle(signal.SIGINT, None)
        assert stop.flag  # the loop saves `emergency` at the end of this step, as for SIGTERM
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers of before the run are back


def test_resume_with_another_lora_alpha_is_refused(demo_dir, tmp_path):
    train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 2}))
    with pytest.raises(ValueError, match=r"trained with lora.alpha = 32.0, this run has \[16.0\]"):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 3}, lora={"alpha": 16.0}))


def test_16_bit_images_and_integer_audio_arrays_are_scaled(tmp_path):
    from PIL import Image
    grey = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(grey).save(tmp_path / "a.png")  # a 16-bit greyscale PNG
    out = media.load_image(tmp_path / "a.png")
    assert out.shape == (3, 64, 64) and torch.equal(out[0], out[2])
    np.testing.assert_allclose(out[0].numpy(), grey / 257.0, atol=0.51)  # 256 levels, not 17
    np.save(tmp_path / "b.npy", np.stack([grey] * 3 + [grey], -1))  # uint16 RGBA: alpha dropped
    assert torch.equal(media.load_image(tmp_path / "b.npy"), out)
    wave = np.sin(np.linspace(0, 20, 1600)) * 0.5
    for dtype, scale in ((np.int16, 32768), (np.int32, 2 ** 31), (np.float32, 1.0)):
        np.save(tmp_path / "c.npy", (wave * scale).astype(dtype))
        np.testing.assert_allclose(media.load_audio(tmp_path / "c.npy", 16000).numpy(), wave, atol=1e-4)


def wav_bytes(samples: bytes, fmt: int, channels: int, bits: int, extensible: bool = False, rate: int = 16000):
    """A RIFF/WAVE file: `fmt` 1 (PCM) or 3 (float), the plain header or WAVE_FORMAT_EXTENSIBLE."""
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", 0xFFFE if extensible else fmt, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, then the sub-format GUID, which starts with the format tag
        guid_tail = bytes.fromhex("000000001000800000aa00389b71")
        body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", fmt) + guid_tail
    chunks = b"fmt " + struct.pack("<I", len(body)) + body + b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.mark.parametrize("kind", ["float32", "float64", "pcm24 extensible", "pcm16 stereo extensible"])
def test_float_and_extensible_wavs_decode(tmp_path, kind):
    x = np.sin(np.linspace(0, 30, 800)) * 0.7
    if kind.startswith("float"):
        raw, fmt, bits, channels = x.astype("<f4" if kind == "float32" else "<f8").tobytes(), 3, int(kind[-2:]), 1
    elif kind.startswith("pcm24"):
        q = np.round(x * (2 ** 23 - 1)).astype(np.int64) & 0xFFFFFF
        raw = np.stack([(q >> s) & 0xFF for s in (0, 8, 16)], -1).astype(np.uint8).tobytes()
        fmt, bits, channels = 1, 24, 1
    else:
        raw, fmt, bits, channels = np.round(np.stack([x, x], -1) * 32767).astype("<i2").tobytes(), 1, 16, 2
    (tmp_path / "a.wav").write_bytes(wav_bytes(raw, fmt, channels, bits, extensible="extensible" in kind))
    np.testing.assert_allclose(media.load_audio(tmp_path / "a.wav", 16000).numpy(), x, atol=1e-4)
    (tmp_path / "b.wav").write_bytes(wav_bytes(raw, 2, channels, bits))  # format 2 (ADPCM) is named and refused
    with pytest.raises(ValueError, match="format 2 .*-bit WAV is not supported; supported: PCM 8/16/24/32-bit"):
        media.load_audio(tmp_path / "b.wav", 16000)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_medium_that_fails_only_when_decoded_obeys_on_error(demo_dir, tmp_path, on_error):
    """Audio of NaN passes the start-up check (its header is fine) and fails when decoded mid-training: "raise"
    names the file, line and id; "skip" trains on, lists the sample in skipped.jsonl and counts it."""
    samples = [sample(f"g{i}", audio=f"media/train-{i:05d}.wav") for i in range(1, 16) if
               (demo_dir / "data" / "media" / f"train-{i:05d}.wav").exists()][:5]
    samples.insert(2, sample("nan", audio="media/nan.npy"))
    path = dataset_file(tmp_path / "ds", demo_dir, samples)
    np.save(tmp_path / "ds" / "media" / "nan.npy", np.full(16000, np.nan, np.float32))
    cfg = demo_config(demo_dir, tmp_path / "run", data={"train_file": str(path), "val_file": "", "on_error": on_error},
                      train={"max_steps": 4, "batch_size": 2})
    if on_error == "raise":
        with pytest.raises(data.SampleError, match=rf"{path}:3: sample 'nan': cannot decode audio file .*NaN or Inf"):
            train.fit(cfg)
        return
    assert train.fit(cfg)["step"] == 4
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["line"]) for s in skipped] == [("nan", 3)] and "NaN or Inf" in skipped[0]["reason"]
    assert rows(tmp_path / "run")[-1]["skipped_samples"] == 1


def test_a_stale_feature_cache_is_refused(demo_dir, tmp_path):
    """The cache records the aligner's weights and each medium's size and time: other weights, an edited medium or
    a sample missing from the cache are errors at start-up that say to rebuild."""
    import shutil
    data_dir = tmp_path / "ds"
    shutil.copytree(demo_dir / "data", data_dir)
    cfg = demo_config(demo_dir, tmp_path / "run", data={"train_file": str(data_dir / "train.jsonl"), "val_file": "",
                                                        "feature_cache": str(tmp_path / "cache")})
    train.build_cache(cfg)
    tokenizer, mm = build.build_model(cfg, torch.device("cpu"))
    assert len(train.make_dataset(cfg, cfg.data.train_file, tokenizer, mm.aligner)) == 48
    other = encoders.Aligner(mm.aligner.config)  # same shapes, other weights
    with pytest.raises(ValueError, match="built with other aligner weights .* rebuild it"):
        train.make_dataset(cfg, cfg.data.train_file, tokenizer, other)
    medium = data.ConversationDataset(cfg.data.train_file, tokenizer, mm.aligner.config, {"image": 16, "audio": 8},
                                      128).examples[0].media
    edited = next(f for files in medium.values() for f in files)
    edited.write_bytes(edited.read_bytes())  # the same bytes, written again: a new modification time
    os.utime(edited, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(data.SampleError, match=f"{edited} changed since the feature cache .* was built"):
        train.make_dataset(cfg, cfg.data.train_file, tokenizer, mm.aligner)
    (data_dir / "train.jsonl").write_text(json.dumps(sample("new", image="media/val-00001.npy")) + "\n")
    with pytest.raises(data.SampleError, match="sample 'new': not in the feature cache"):
        train.make_dataset(cfg, cfg.data.train_file, tokenizer, mm.aligner)


# -- Errors that should be clear ------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_and_json_lists_give_lines(demo_dir, tmp_path):
    tok = tokenizer.load_tokenizer(demo_dir / "llm", chat_format="chatml")
    acfg = encoders.load_aligner(demo_dir / "aligner-init").config
    good = {"id": "g", "messages": [{"role": "user", "content": "one plus one?"}, {"role": "assistant",
                                                                                  "content": "two"}]}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    assert len(data.ConversationDataset(tmp_path / "bom.jsonl", tok, acfg, {}, 128)) == 1
    text = "[\n" + json.dumps(good) + ",\n\n" + json.dumps({"id": "r", "messages": [{"role": "robot"}]}) + "\n]"
    (tmp_path / "list.json").write_text(text)
    with pytest.raises(data.SampleError, match=r"list.json:4: sample 'r'"):
        data.ConversationDataset(tmp_path / "list.json", tok, acfg, {}, 128)


@pytest.mark.parametrize("how", ["out_dir is a file", "disk full in torch.save"])
def test_unwritable_output_is_a_checkpoint_write_error(demo_dir, tmp_path, monkeypatch, how):
    if how == "out_dir is a file":
        (tmp_path / "run").write_text("a file where the folder should be")
        with pytest.raises(CheckpointWriteError, match="cannot use run.out_dir = .*run'.*give a folder"):
            train.fit(demo_config(demo_dir, tmp_path / "run"))
        return
    real = torch.save
    monkeypatch.setattr(train.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos")))
    with pytest.raises(CheckpointWriteError, match="unexpected pos. The previous checkpoint is intact"):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 1}))
    monkeypatch.setattr(train.torch, "save", real)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("state", ["{}", "garbage"])
def test_an_unreadable_checkpoint_gives_way_to_an_older_one(demo_dir, tmp_path, state, capsys):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 4, "save_every": 2})
    train.fit(cfg)
    (tmp_path / "checkpoints" / "step_0000004" / "state.json").write_text(state)
    with pytest.raises(CheckpointReadError, match="step_0000004: checkpoint cannot be read"):
        train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 5, "resume": str(tmp_path / "checkpoints" /
                                                                                           "step_0000004")}))
    capsys.readouterr()
    result = train.fit(demo_config(demo_dir, tmp_path, train={"max_steps": 5, "save_every": 2}))
    out = capsys.readouterr().out
    assert "skipping a checkpoint that cannot be read: " in out and "step_0000004" in out
    assert f"resumed from {tmp_path / 'checkpoints' / 'best'} at step 4" in out and result["step"] == 5


def test_config_without_architectures_and_exports_readable_by_all(hf_models, demo_dir, tmp_path):
    import shutil
    folder, _ = hf_models["qwen2"]
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["architectures"]  # as PretrainedConfig.save_pretrained writes a bare config
    (bare / "config.json").write_text(json.dumps(cfg))
    assert model.load_llm(bare).config.architecture == "Qwen2ForCausalLM"
    train.fit(demo_config(demo_dir, tmp_path / "run", train={"max_steps": 1}))
    for f in (tmp_path / "run" / "export").rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_validate_names_the_users_file_not_its_subset(demo_dir, tmp_path, monkeypatch):
    """A bad medium that only training finds is reported by validate.py with the data file's own line."""
    import validate
    samples = [sample(f"g{i}", image="media/train-00001.npy") for i in range(5)]
    samples.append(sample("nan", audio="media/nan.npy"))
    path = dataset_file(tmp_path / "ds", demo_dir, samples)
    np.save(tmp_path / "ds" / "media" / "nan.npy", np.full(16000, np.nan, np.float32))
    cfg = demo_config(demo_dir, tmp_path / "run", data={"train_file": str(path), "val_file": ""})
    monkeypatch.setattr(validate, "distributed", lambda s, ds: "skipped in this test")
    res = {r["check"]: r for r in validate.validate(cfg, quick=True)}
    assert res["Data pipeline"]["passed"] and not res["Resume"]["passed"]  # the first batch decodes
    assert f"{path}:6: sample 'nan'" in res["Resume"]["detail"] and "subset" not in res["Resume"]["detail"]


def test_launch_sh_beside_a_busy_default_port_and_stopped_by_sigterm(demo_dir, tmp_path):
    """launch.sh with a config path relative to where it is run, port 29500 taken (another launch.sh, say): a
    one-node run picks a free port and trains. A SIGTERM to the launcher reaches torchrun and train.py, which saves
    its emergency checkpoint; nothing keeps training."""
    cfg = demo_config(demo_dir, tmp_path / "run", run={"device": "cpu"}, data={"val_file": ""},
                      train={"max_steps": 100000})
    metrics = tmp_path / "run" / "metrics.jsonl"
    with socket.socket() as busy:
        with contextlib.suppress(OSError):  # taken already: busy all the same
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        p = launch_sh(cfg, tmp_path, "my", SKIP_PREFLIGHT="1")
        try:
            deadline = time.time() + 150
            while not (metrics.is_file() and metrics.read_text().count("\n")):  # a step is done
                assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
                time.sleep(0.2)
            worker = int(re.search(r"pid (\d+)", (tmp_path / "run" / "run.lock").read_text())[1])
            os.kill(p.pid, signal.SIGTERM)
            out = p.communicate(timeout=90)[0]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    state = json.loads((tmp_path / "run" / "checkpoints" / "emergency" / "state.json").read_text())
    assert state["step"] >= 1 and "EADDRINUSE" not in out and "stop requested: emergency checkpoint" in out, out
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


def test_a_second_first_run_waits_for_the_demo_being_made(tmp_path):
    """While one process makes the demo's assets (here: this test holds its lock), another waits for it instead of
    writing the same files, then goes on."""
    import fcntl

    folder = tmp_path / "demo"
    folder.mkdir()
    holder = open(folder / ".lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import demo; "
            "demo.ensure_demo(sys.argv[2], phase1=False, n_train=24, n_val=4, pretrain_steps=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    assert "waiting for it" in proc.stdout.readline()
    time.sleep(0.5)
    assert proc.poll() is None and not (folder / "READY").exists()  # still waiting, nothing written
    holder.close()  # the lock is released
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "first run, making" in out and (folder / "READY").is_file()

"""Faults, kills and hostile input, one test per kind: each is a clear error that names what to fix, a listed skip,
or correct training, and nothing that was saved is lost (the README's fault-tolerance table, docs/fault-tolerance.md,
proved)."""
import contextlib
import csv
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_args, cut_tokenizer, demo_config, launch_sh, rows, snapshot, torchrun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import build
import data
import encoders
import media
import model
import tokenizer
import train
from checkpoint import CheckpointReadError, CheckpointWriteError, RunLock, find_resume, load_checkpoint
from distributed import World
from encoders import load_aligner
from tokenizer import load_tokenizer

DRIVER = str(ROOT / "tests" / "fault_driver.py")


def test_ranks_the_checkpoint_holds_no_rng_state_for_draw_apart(demo_dir, tmp_path):
    """A checkpoint saved by one rank holds no RNG state for ranks 1 and 2 of a resumed 3-rank run: each is seeded
    by its rank and the step, so their dropout masks differ from each other's and from a fresh start's."""
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 2})
    train.fit(cfg)
    draws = []
    for rank in (1, 2):
        _, mm = build.build_model(cfg, torch.device("cpu"))  # seeds alike on every rank (the same initialisation)
        opt, _ = train.make_optimizer(mm, cfg.train)
        scaler, _ = train.mixed_precision(cfg.train, torch.device("cpu"))
        load_checkpoint(tmp_path / "checkpoints" / "step_0000002", mm, opt, scaler, World(rank=rank, size=3),
                        cfg.train.seed)
        draws.append(torch.rand(8))
    torch.manual_seed(cfg.train.seed + 1)  # rank 1's fresh start
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], torch.rand(8))


def loads_cleanly(cfg) -> int:
    """Resume as train.py would: the checkpoint it picks loads into a fresh model. Returns its step."""
    path = find_resume(cfg)
    assert path is not None and not path.name.startswith(".")
    _, mm = build.build_model(cfg, torch.device("cpu"))
    opt, _ = train.make_optimizer(mm, cfg.train)
    scaler, _ = train.mixed_precision(cfg.train, torch.device("cpu"))
    return load_checkpoint(path, mm, opt, scaler, World(), cfg.train.seed).step


def test_kill_9_during_saves_never_corrupts_the_last_checkpoint(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 400, "save_every": 1, "keep_last": 2})
    ckpt = tmp_path / "checkpoints"
    rng = random.Random(0)
    steps = []
    for trial in range(2):
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


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_a_raise_stops_them_without_a_hang(demo_dir, tmp_path):
    """Rank 1's loss is NaN at steps 3 and 4, and its 5th forward raises: every rank skips those two steps, then
    every rank stops, and rank 0 saves the last whole step alone."""
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 50, "batch_size": 2, "max_bad_steps": 3})
    t0 = time.time()
    r = torchrun(cli_args(cfg), 2, script=DRIVER, env={"FAULT_RANK": "1", "NAN_FROM": "3", "RAISE_AT": "5"},
                 timeout=180)
    assert r.returncode != 0 and time.time() - t0 < 120
    assert "injected fault" in r.stderr + r.stdout
    state = json.loads((tmp_path / "checkpoints" / "emergency" / "state.json").read_text())
    assert state["step"] == 2 and state["bad_steps"] == 2


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


# -- A run's folder: never written over, each metric row once, leftovers cleared, one-line errors ------------------


def main_of(module, argv, capsys) -> tuple[int, str, str]:
    """`module.main(argv)` in this process: (exit code, stdout, stderr); a message given to sys.exit goes to
    stderr, as Python prints it."""
    try:
        module.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, expect: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and expect in err, err


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the trained run (6 steps; checkpoints step_0000006 and best, metrics, export)."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def trained_run_config(demo_dir, out_dir, **sections):
    """The trained run's config (as conftest's `trained_run` made it), `sections` changed."""
    train_keys = {"max_steps": 6, "gen_samples": 2, "lr_lora": 2e-2, "lr_projector": 1e-2, **sections.pop("train", {})}
    return demo_config(demo_dir, out_dir, lora={"dropout": 0.0}, train=train_keys, **sections)


def test_a_fresh_start_over_a_finished_run_is_refused(demo_dir, run_copy, capsys):
    before = snapshot(run_copy)
    cfg = trained_run_config(demo_dir, run_copy, train={"resume": "none", "seed": 5, "max_steps": 10})
    code, _, err = main_of(train, cli_args(cfg), capsys)
    assert code == 2
    one_error_line(err, f"{run_copy} holds the checkpoints of an earlier run (up to step 6, in ")
    assert "give a new run.out_dir, or continue that run with train.resume = \"auto\"" in err
    assert snapshot(run_copy) == before


def test_a_busy_out_dir_is_one_line(demo_dir, run_copy, capsys):
    lock = RunLock(run_copy)
    try:
        code, _, err = main_of(train, cli_args(trained_run_config(demo_dir, run_copy, train={"max_steps": 8})), capsys)
    finally:
        lock.release()
    assert code == 2
    one_error_line(err, f"{run_copy} is in use by another run (host ")
    assert f"pid {os.getpid()}" in err


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_folder(demo_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cfg = demo_config(demo_dir, tmp_path, data={"val_file": ""}, train={"max_steps": 1})
    code, _, err = main_of(train, cli_args(cfg), capsys)
    assert code == 2
    one_error_line(err, f"error: cannot write {tmp_path / 'checkpoints' / 'step_0000001'}: Error while serializing")
    assert "No space left on device" in err and "The previous checkpoint is intact" in err
    assert not list((tmp_path / "checkpoints").iterdir())  # no temporary folder left, no checkpoint that looks whole


def test_a_cut_tokenizer_is_one_line_naming_it_in_training_and_validation(demo_dir, tmp_path, capsys, monkeypatch):
    import validate
    tok = cut_tokenizer(demo_dir / "llm", tmp_path / "llm")
    cfg = demo_config(demo_dir, tmp_path / "run", model={"llm": str(tmp_path / "llm")})
    code, _, err = main_of(train, cli_args(cfg), capsys)
    assert code == 2
    one_error_line(err, f"error: {tok}: not a readable tokenizer (")
    monkeypatch.setattr(validate, "distributed", lambda s, ds: "skipped in this test")
    row = {r["check"]: r for r in validate.validate(cfg, quick=True)}["Model initialization"]
    assert not row["passed"] and f"{tok}: not a readable tokenizer" in row["detail"]


@pytest.mark.parametrize("key,value", [("train.lr_lora", "nan"), ("lora.alpha", "inf"), ("train.grad_clip", "-inf")])
def test_a_config_float_that_is_not_finite_is_refused_by_name(demo_dir, tmp_path, capsys, key, value):
    code, _, err = main_of(train, [*cli_args(demo_config(demo_dir, tmp_path)), f"--{key}={value}"], capsys)
    assert code == 1
    one_error_line(err, f"config error: {key} = {float(value)}; it must be a finite number")
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("saved,resumed", [("none", "nf4"), ("nf4", "none")])
def test_resume_across_quantization_is_refused_naming_both_bases(demo_dir, trained_run, tmp_path, capsys, saved,
                                                                 resumed):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run / "checkpoints" / "best", ckpt)
    if saved == "nf4":  # what a QLoRA run's checkpoint records; its tensors have these names and shapes too
        state = json.loads((ckpt / "state.json").read_text())
        state["config"]["model"]["quantize"] = "nf4"
        (ckpt / "state.json").write_text(json.dumps(state))
    cfg = trained_run_config(demo_dir, tmp_path / "run", model={"quantize": resumed},
                             train={"resume": str(ckpt), "max_steps": 8})
    code, _, err = main_of(train, cli_args(cfg), capsys)
    bases = {"nf4": "an NF4 (4-bit, QLoRA) base, model.quantize = \"nf4\"",
             "none": "an unquantized base, model.quantize = \"none\""}
    assert code == 2
    one_error_line(err, f"{ckpt}: checkpoint was trained on {bases[saved]}, and this run loads {bases[resumed]}")
    assert f"use model.quantize = \"{saved}\" as it was trained" in err
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_resume_drops_the_metric_rows_of_the_stopped_attempt_past_its_checkpoint(demo_dir, run_copy, capsys):
    """Killed at step 8 after its checkpoint of step 6 (the rows of 7 and 8 logged, the last cut short): the
    resumed run logs each step once, in both files."""
    for name, lines in (("metrics.jsonl", [json.dumps({"step": 7, "split": "train", "loss": 1.0}) + "\n",
                                           '{"step": 8, "spl']),
                        ("metrics.csv", ["7,0.5,train,1.0\n", "8,0.6,tr"])):
        with open(run_copy / name, "a") as f:
            f.write("".join(lines))
    result = train.fit(trained_run_config(demo_dir, run_copy, train={"max_steps": 8}))
    assert result["step"] == 8 and "dropped 2 metric rows past step 6" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in rows if r["split"] == "val"] == [6, 8]
    with open(run_copy / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["step"]), r["split"]) for r in table] == [(r["step"], r["split"]) for r in rows]


def test_leftovers_of_dead_writers_are_removed_at_the_next_start(demo_dir, run_copy, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID is free: a writer killed with -9
    dead = [run_copy / "checkpoints" / f".tmp-step_0000008-{gone.pid}", run_copy / f".tmp-export-{gone.pid}",
            run_copy / "checkpoints" / f".latest-{gone.pid}"]
    for p in dead[:2]:
        p.mkdir()
        (p / "trainable.safetensors").write_bytes(b"half written")
    dead[2].write_text("step_0000008\n")
    (run_copy / "checkpoints" / "best").rename(run_copy / "checkpoints" / f".old-best-{gone.pid}")  # in its swap
    live = run_copy / f".tmp-export-{os.getppid()}"  # a live writer's (generate.py --export, say) stays
    live.mkdir()
    lock = train.prepare_out_dir(trained_run_config(demo_dir, run_copy), World())
    lock.release()
    out = capsys.readouterr().out
    assert not any(p.exists() for p in dead) and live.is_dir(), out
    assert all(f"removed {p}, left half-written by a stopped process (pid {gone.pid})" in out for p in dead), out
    assert (run_copy / "checkpoints" / "best" / "state.json").is_file() and "put back" in out


def test_phase1_of_the_demo_stopped_by_a_signal_stops_train_py_cleanly(demo_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM to demo.py --phase1 (train.py's child): it saves its emergency checkpoint and exits with the code
    that says so (DEMO_STOPPED); train.py then stops as a stopped Phase 2 does, in one line, no traceback."""
    import demo
    folder = tmp_path / "demo"
    shutil.copytree(demo_dir, folder, ignore=shutil.ignore_patterns("align"))
    (folder / "READY").write_text("demo assets complete\n")
    monkeypatch.setattr(train, "fit", lambda cfg, world=None: {"stopped": True, "step": 3})  # the child's Phase 1
    code, _, err = main_of(demo, [folder, "--phase1"], capsys)
    assert code == train.DEMO_STOPPED
    one_error_line(err, f"demo: Phase 1 was stopped; run the command again to resume it in {folder / 'align'}")
    monkeypatch.undo()
    monkeypatch.setattr(train.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, code))
    cfg = demo_config(demo_dir, tmp_path / "run", data={"make_demo": str(folder)})
    code, _, err = main_of(train, cli_args(cfg), capsys)
    assert code == 1
    one_error_line(err, f"stop requested: the demo's Phase 1 saved an emergency checkpoint in {folder / 'align'}; "
                        "run the command again to resume it")


def test_launch_sh_stops_a_config_error_once_before_torchrun(demo_dir, tmp_path):
    """A bad key, and a bad value that only the model's shapes show (NF4 blocks of 7), with the pre-flight off:
    one line each, before torchrun starts (which would start train.py again on each restart)."""
    cfg = demo_config(demo_dir, tmp_path / "run", run={"device": "cpu"})
    bad_key = launch_sh(cfg, tmp_path, "a", "--train.bogus=1")
    bad_value = launch_sh(cfg, tmp_path, "b", "--model.quantize=nf4", "--model.quant_block=7", SKIP_PREFLIGHT="1")
    for p, code, expect in ((bad_key, 1, "config error: command line: unknown key train.bogus"),
                            (bad_value, 2, "error: model.quant_block = 7: a power of two")):
        out = p.communicate(timeout=120)[0]
        assert p.returncode == code and out.strip().startswith(expect) and out.count("\n") == 1, out
    assert not (tmp_path / "run" / "logs").exists()  # stopped before anything was started


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


def test_float_audio_far_outside_its_range_is_refused(tmp_path):
    """A float WAV's samples lie in [-1, 1]; samples of 1e38 (finite, but their squares overflow in the encoder's
    features) are refused with the file named, as NaN is; a clip a little over full scale is kept."""
    loud = np.array([1e38, -1e38, 0.5, 0.0], "<f4")
    (tmp_path / "loud.wav").write_bytes(wav_bytes(loud.tobytes(), 3, 1, 32))
    with pytest.raises(ValueError, match=r"loud.wav: cannot decode audio .*samples reach 1e\+38, far outside"):
        media.load_audio(tmp_path / "loud.wav", 16000)
    (tmp_path / "over.wav").write_bytes(wav_bytes((loud / 1e38 * 1.2).astype("<f4").tobytes(), 3, 1, 32))
    assert media.load_audio(tmp_path / "over.wav", 16000).abs().max() == pytest.approx(1.2)


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


def test_a_full_disk_while_logging_metrics_is_one_line_and_the_run_resumes(demo_dir, tmp_path, capsys, monkeypatch):
    """metrics.jsonl finds the disk full at step 3: one line naming the folder and what to do, exit code 2, the
    step-2 checkpoint untouched; the same command then resumes and logs each step once."""
    import metrics
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 4, "save_every": 2})
    real_open = open

    class FullAfter:  # a file whose third write finds the disk full
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                self.f.write(text[: len(text) // 2])  # a line cut short, as a full disk leaves it
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def opening(path, *a, **k):
        f = real_open(path, *a, **k)
        return FullAfter(f) if str(path).endswith("metrics.jsonl") else f
    monkeypatch.setattr(metrics, "open", opening, raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(cli_args(cfg))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write the metrics in {tmp_path} (No space left on device) at step 3; the "
                          "checkpoints are untouched")
    assert loads_cleanly(cfg) == 2
    monkeypatch.undo()
    assert train.fit(cfg)["step"] == 4
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"] == [1, 2, 3, 4]

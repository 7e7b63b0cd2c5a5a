"""Trackers, alerts and the heartbeat (track.py): what MLflow, TensorBoard and W&B read back equals metrics.jsonl,
step by step, across a kill and resume; a failing tracker never stops training; each alert fires once on a run made
sick for it, and a healthy run sends only its end."""
import importlib.util
import json
import shutil
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, demo_config, rows

import config
import track
import train
from checkpoint import CheckpointWriteError
from config import load_config


def alert_command(folder):
    """A shell command that appends each event's JSON (its stdin) and its MMLORA_EVENT, MMLORA_STEP and MMLORA_LEVEL
    to files in `folder`."""
    return (f"cat >> {folder}/events.jsonl; echo >> {folder}/events.jsonl; "
            f"echo \"$MMLORA_EVENT $MMLORA_STEP $MMLORA_LEVEL\" >> {folder}/env.txt")


def events(folder):
    lines = (folder / "events.jsonl").read_text().split("\n") if (folder / "events.jsonl").exists() else []
    return [json.loads(line) for line in lines if line.strip()]


TIMINGS = ("step_time", "tokens_per_s", "data_wait", "peak_mem_gib")  # differ when a step is run again


def held_by_mlflow(client, run_id):
    """{metric: {step: value}} of an MLflow run, checking that each step is held once."""
    held = {}
    for name in client.get_run(run_id).data.metrics:
        history = client.get_metric_history(run_id, name)
        assert len({m.step for m in history}) == len(history), (name, [m.step for m in history])
        held[name] = {m.step: m.value for m in history}
    return held


def tracker_view(out_dir, skip=()):
    """metrics.jsonl as a tracker names it, {metric: {step: value}}, each (split, step) from its last row (a resume
    logs the steps after its checkpoint again), without the keys in `skip`."""
    want = {}
    for split in ("train", "val"):
        for r in rows(out_dir, split):
            for name, value in track.scalars(r).items():
                if name.split("/")[1] not in skip:
                    want.setdefault(name, {})[r["step"]] = value
    return want


def held_by_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {name: [(e.step, e.value) for e in acc.Scalars(name)] for name in acc.Tags()["scalars"]}, acc.Tags()


def as_float32(want):
    return {name: [(s, pytest.approx(float(np.float32(v)), rel=1e-6)) for s, v in sorted(steps.items())]
            for name, steps in want.items()}


def test_trackers_hold_the_rows_once_across_a_kill_and_resume(demo_dir, tmp_path, monkeypatch):
    """A short run's rows, parameters, tags, answers and artifacts, read back through MLflow's client, TensorBoard's
    reader and W&B's offline files (where W&B is installed), equal metrics.jsonl and the run's files; after a kill
    and resume the same MLflow run holds each step once. The healthy run sends no alert but its end."""
    from mlflow import MlflowClient

    wandb = importlib.util.find_spec("wandb") is not None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = demo_config(demo_dir, out, train={"max_steps": 4, "eval_every": 4, "save_every": 2, "eval_samples": 4,
                                            "gen_samples": 2},
                      run={"trackers": ["mlflow", "tensorboard"] + ["wandb"] * wandb, "tracker_samples": 2,
                           "alert_command": alert_command(tmp_path)})
    train.fit(cfg)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    want = tracker_view(out)
    assert held_by_mlflow(client, run_id) == want
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/data_wait", "train/peak_mem_gib",
            "train/loss_image", "val/loss", "val/accuracy"} <= set(want)
    assert held_by_tensorboard(out / "tensorboard")[0] == as_float32(want)

    resolved = json.loads((out / "config.json").read_text())
    assert run.data.params == {k: str(v) for k, v in track.flatten(resolved).items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tags = run.data.tags
    assert tags["world_size"] == "1" and tags["devices"] == "1 x CPU" and tags["phase"] == "instruct"
    assert tags["git_commit"].split("+")[0] == (commit or "none")
    client.download_artifacts(run_id, "", str(tmp_path / "artifacts"))
    got = tmp_path / "artifacts"
    for name in ("config.json", "export/adapter/adapter_model.safetensors", "export/projectors.safetensors"):
        assert (got / name).read_bytes() == (out / name).read_bytes(), name
    assert not (got / "export" / "merged").exists()  # tracker_artifacts = "light"
    table = json.loads((got / "predictions/step_0000004.json").read_text())  # the evaluation's answers
    assert table["columns"] == ["id", "question", "prediction", "reference", "correct", "image"]
    assert len(table["data"]) == 2 and all((got / r[5]).is_file() for r in table["data"] if r[5])
    if wandb:
        [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
        held = {}
        for h in wandb_history(run_file):
            for name, value in h.items():
                held.setdefault(name, {})[h["_step"]] = value
        assert {k: held[k] for k in want} == want
        assert held["val/predictions/_type"] == {4: "table-file"} and held["val/predictions/nrows"] == {4: 2}
        table = json.loads((run_file.parent / "files" / held["val/predictions/path"][4]).read_text())
        assert table["columns"][:4] == ["id", "question", "prediction", "reference"] and len(table["data"]) == 2

    # killed after step 4 was logged, before its checkpoint: the resume starts from step 2 and runs 3 and 4 again
    shutil.rmtree(out / "checkpoints" / "step_0000004")
    (out / "checkpoints" / "latest").write_text("step_0000002\n")
    cfg.run.trackers = ["mlflow", "tensorboard"]
    assert train.fit(cfg)["step"] == 4
    assert json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    assert len(client.search_runs([client.get_experiment_by_name("mmlora").experiment_id])) == 1
    held = held_by_mlflow(client, run_id)  # each step once: the steps run again are the ones MLflow holds already
    assert {k: set(v) for k, v in held.items()} == {k: set(v) for k, v in want.items()}
    assert {k: v for k, v in held.items() if k.split("/")[1] not in TIMINGS} == tracker_view(out, skip=TIMINGS)
    scalars, tags = held_by_tensorboard(out / "tensorboard")  # readers drop the events past the restored step
    assert scalars == as_float32(tracker_view(out)) and tags["images"]

    # healthy: no alert but the end of each run, and the heartbeat's last word
    assert [(e["event"], e["level"], e["status"], e["step"]) for e in events(tmp_path)] == [
        ("end", "info", "finished", 4), ("end", "info", "finished", 4)]
    assert (tmp_path / "env.txt").read_text().splitlines() == ["end 4 info", "end 4 info"]
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["step"] == 4 and beat["status"] == "finished"


def wandb_history(run_file):
    """The history rows of a W&B run file (<dir>/wandb/*/run-ID.wandb: LevelDB-style records of W&B's protobuf
    Record, in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    buf, pos, part, out = run_file.read_bytes(), 7, b"", []
    assert buf[:4] == b":W&B"
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        part, pos = part + buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracker_not_installed_stops_at_the_config_with_the_pip_command(monkeypatch, tmp_path):
    real = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"run.trackers names wandb, not installed here: pip install wandb \(or"):
        load_config(None, ["--run.trackers=mlflow,wandb"])
    with pytest.raises(ValueError, match="unknown tracker 'comet'; known: mlflow, tensorboard, wandb"):
        load_config(None, ["--run.trackers=comet"])
    with pytest.raises(SystemExit, match="^config error: run.trackers names wandb"):
        train.main(["--run.trackers=wandb", f"--run.out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()  # stopped before anything was made
    assert load_config(None, []).run.trackers == []
    for written in ("mlflow,tensorboard", "['mlflow', 'tensorboard']", '["mlflow","tensorboard"]'):
        assert load_config(None, [f"--run.trackers={written}"]).run.trackers == ["mlflow", "tensorboard"]


def test_a_sick_run_alerts_once_for_each_sickness_and_its_failing_trackers_say_why(demo_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    """A run whose MLflow server cannot be reached, whose TensorBoard disk fills at its second row, whose loss
    spikes at step 6 and whose loader stalls an hour before step 7 (on a clock moved forward, so that the test takes
    no hour and the machine's load cannot fake a stall): each tracker's failure is said once in one line, spike,
    stall (seen by the watchdog while the loader waits) and slow fire once each, with their steps, then the run's
    end; the run finishes with every row in metrics.jsonl."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    tensorboard_rows = []

    def full_disk(self, step, values):
        tensorboard_rows.append(step)
        if len(tensorboard_rows) >= 2:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(track.TensorBoardTracker, "scalars", full_disk)
    real_row, real_loader = train.train_row, train.make_loader
    real_time, real_perf_counter, hour = time.time, time.perf_counter, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + hour[0])
    monkeypatch.setattr(time, "perf_counter", lambda: real_perf_counter() + hour[0])

    def spiking_row(run, *args, **kwargs):
        row = real_row(run, *args, **kwargs)
        if run.step == 6:
            row["loss"] *= 20
        return row

    def stalling_loader(*args, **kwargs):
        for i, batch in enumerate(real_loader(*args, **kwargs)):
            if i == 6:  # the batch of step 7: an hour passes, and the loader waits for the watchdog to see it
                hour[0] = 3600.0
                deadline = real_perf_counter() + 30
                while "stall" not in [e["event"] for e in events(tmp_path)] and real_perf_counter() < deadline:
                    time.sleep(0.05)
            yield batch
    monkeypatch.setattr(train, "train_row", spiking_row)
    monkeypatch.setattr(train, "make_loader", stalling_loader)
    cfg = demo_config(demo_dir, tmp_path / "run", data={"val_file": ""}, train={"max_steps": 7},
                      run={"trackers": ["mlflow", "tensorboard"], "alert_command": alert_command(tmp_path),
                           "alert_slow": 0.01})  # (the default stall: 1800 s)
    assert train.fit(cfg)["step"] == 7 and [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4, 5, 6, 7]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tracker ")]
    assert len(said) == 2 and tensorboard_rows == [1, 2], said
    assert said[0].startswith("tracker mlflow stopped (start): OSError: cannot reach http://127.0.0.1:")
    assert said[1].startswith("tracker tensorboard stopped (log): OSError: [Errno 28] No space left on device")

    got = [(e["event"], e["step"]) for e in events(tmp_path)]
    assert sorted(got) == sorted([("spike", 6), ("stall", 6), ("slow", 7), ("end", 7)]), got
    assert got[-1] == ("end", 7)
    spike = next(e for e in events(tmp_path) if e["event"] == "spike")
    assert spike["level"] == "warning" and "its moving average" in spike["message"]
    assert spike["run_dir"] == str((tmp_path / "run").resolve())
    assert [r["data_wait"] > 3600 for r in rows(tmp_path / "run")] == [False] * 6 + [True]


def test_nonfinite_steps_and_a_failed_checkpoint_alert_then_the_crash(demo_dir, tmp_path, monkeypatch):
    real_clip, real_save = train.nn.utils.clip_grad_norm_, torch.save

    def nan_from_step_2(params, max_norm):
        if params[0].grad is not None and nan_from_step_2.calls > 0:
            params[0].grad.view(-1)[0] = float("nan")
        nan_from_step_2.calls += 1
        return real_clip(params, max_norm)
    nan_from_step_2.calls = 0

    def full_disk(obj, f, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.nn.utils, "clip_grad_norm_", nan_from_step_2)
    monkeypatch.setattr(train.torch, "save", full_disk)
    cfg = demo_config(demo_dir, tmp_path / "run", data={"val_file": ""},
                      train={"max_steps": 6, "max_bad_steps": 2, "save_every": 0},
                      run={"alert_command": alert_command(tmp_path)})
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        train.fit(cfg)
    monkeypatch.setattr(train.torch, "save", real_save)
    got = [(e["event"], e["level"], e["step"]) for e in events(tmp_path)]
    assert got == [("nonfinite", "error", 1), ("checkpoint_failed", "error", 1), ("end", "error", 1)], got
    assert "2 non-finite steps in a row" in events(tmp_path)[0]["message"]
    assert events(tmp_path)[-1]["status"] == "crashed"
    assert json.loads((tmp_path / "run" / "heartbeat.json").read_text())["status"] == "crashed"


def test_alert_command_gets_the_event_on_stdin_and_in_its_environment(tmp_path):
    alerts = track.Alerts(alert_command(tmp_path), 3.0, 0.0, 0.25, tmp_path)
    alerts.beat(3)
    alerts.fire("checkpoint_failed", "cannot write x", 3)
    alerts.fire("checkpoint_failed", "cannot write x again", 3)  # the same kind within the hour: said, not sent
    alerts.close("finished")
    assert [e["event"] for e in events(tmp_path)] == ["checkpoint_failed", "end"]
    assert (tmp_path / "env.txt").read_text().splitlines() == ["checkpoint_failed 3 error", "end 3 info"]

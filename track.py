"""Watching a run from outside: experiment trackers (MLflow, TensorBoard, W&B), alerts on a sick run, and the
heartbeat file. Rank 0 only; train.py feeds both from the rows it writes to metrics.csv/jsonl.

    trackers = Trackers(["mlflow", "tensorboard"], out_dir, "mmlora")   # imports a tracker's package only here
    trackers.start(params, tags, resumed_step)  # the tracked run: new, or the one this folder's resume continues
    trackers.log(row, samples)                  # every metrics row (and an evaluation's answers), queued
    trackers.close(artifacts, "finished")       # config.json and the export folder as artifacts, run ended

    alerts = Alerts(command, spike, stall_s, slow, out_dir)
    alerts.beat(step)                           # a step ended: the watchdog's clock and the heartbeat
    alerts.check(row)                           # loss spike, tokens/s below a share of the run's median
    alerts.fire("nonfinite", "...", step)       # the loop's own events; alerts.close(status, error) at the end

Nothing here reads the GPU, and nothing here stops training. The trackers run in a thread of their own, fed by a
queue: the training step never waits for a tracker's network or disk. A tracker that fails (a server that cannot be
reached, a full disk) is said once in one line and dropped; metrics.csv/jsonl carry on. Each tracker mirrors the
rows: `train/loss`, `train/lr`, ..., `val/loss`, `val/accuracy` (Phase 1: `val/r1_image_text`, ...) at the row's
step; the resolved config as flattened parameters (`train.lr_lora`); the git commit, the world size and the GPUs
as tags. A resumed run continues the same tracked run (ids kept in <out_dir>/trackers.json), each step once: MLflow
and W&B skip the rows they already hold, TensorBoard's readers drop the events past the restored step
(`purge_step`).

    MLflow        MLFLOW_TRACKING_URI when set, else <out_dir>/mlflow.db (artifacts in <out_dir>/mlartifacts):
                  mlflow ui --backend-store-uri sqlite:///<out_dir>/mlflow.db
    TensorBoard   <out_dir>/tensorboard:  tensorboard --logdir <out_dir>/tensorboard
    W&B           <out_dir>/wandb; WANDB_MODE=offline writes there only (`wandb sync` uploads it later)

Alerts run `alert_command` in a shell, the event as JSON on its standard input and in environment variables
(MMLORA_EVENT, MMLORA_LEVEL, MMLORA_MESSAGE, MMLORA_STEP, MMLORA_RUN_DIR), from a thread of their own. Events, with
their level: nonfinite (error: more non-finite steps in a row than train.max_bad_steps, the run stops), spike and
slow (warning), stall (error: no step ended for alert_stall_s, counted from the end of the first step, which
compiles), checkpoint_failed (error), and end (info when the run finished or stopped, error when it crashed). Every
event is a line in the log; the command runs for each kind but end at most once an hour (a stall: once per stall),
so a sick run pages once, not at every step. The heartbeat, <out_dir>/heartbeat.json, holds the last step, its time
and the run's status, for a cluster's health checks.
"""
from __future__ import annotations

import bisect
import datetime
import importlib.util
import json
import os
import queue
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from weights import write_json

CLOSE_TIMEOUT = 300.0  # seconds the trackers get at the end to send what is queued and their artifacts
ALERT_TIMEOUT = 60.0  # seconds an alert command may run
QUIET_S = 3600.0  # an alert of one kind fires at most once in this many seconds
MIN_ROWS = 5  # logged training rows before a loss spike or a slow row is judged (the first ones compile, warm up)
SPIKE_FLOOR = 0.1  # a spike must also exceed the moving average by this much: ratios of losses near zero are noise
WATCH_S = 1.0  # seconds between the watchdog's looks


def flatten(doc: dict, prefix: str = "") -> dict:
    """{"train": {"lr_lora": 2e-4}} -> {"train.lr_lora": 2e-4}; lists become comma-separated text."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def git_commit(folder: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit the code was run from ("+dirty" when files differ from it), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, as the trackers name them: {"train/loss": 2.1, "train/lr": 2e-4, ...}."""
    return {f"{row['split']}/{k}": float(v) for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def artifact_files(paths: list[Path], mode: str) -> list[tuple[Path, str]]:
    """(file, folder inside the artifacts) of each file under `paths` (files or folders); mode "light" leaves an
    export's merged/ out (the base's size: adapter/ rebuilds it), "none" leaves everything out."""
    out = []
    for p in paths if mode != "none" else []:
        if p.is_file():
            out.append((p, ""))
        for f in sorted(p.rglob("*")) if p.is_dir() else []:
            rel = f.relative_to(p.parent)
            if f.is_file() and not (mode == "light" and (p / "mmlora.json").is_file() and rel.parts[1] == "merged"):
                out.append((f, str(rel.parent)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The trackers, each with the same four calls: start, scalars, samples, finish; `logged`: the steps it holds


class MLflowTracker:
    name = "mlflow"

    def __init__(self, out_dir: Path, project: str, run_name: str):
        self.out_dir, self.project, self.run_name = out_dir, project, run_name

    def start(self, params: dict, tags: dict, saved: dict | None, resumed_step: int) -> dict:
        import logging

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}"
        check_reachable(uri)
        from mlflow import MlflowClient
        from mlflow.entities import Param
        for name in ("mlflow", "alembic"):  # not the store's lines about making its tables
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = client = MlflowClient(uri)
        if saved and saved.get("tracking_uri") == uri and resumed_step > 0:
            self.run_id = saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
        else:
            local = "MLFLOW_TRACKING_URI" not in os.environ
            exp = client.get_experiment_by_name(self.project)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                self.project, artifact_location=(self.out_dir / "mlartifacts").resolve().as_uri() if local else None)
            self.run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))
        held = client.get_run(self.run_id).data.params  # parameters cannot change: a resume's changes are tags
        new = [Param(k, str(v)) for k, v in params.items() if k not in held]
        for i in range(0, len(new), 100):  # MLflow takes 100 parameters a call
            client.log_batch(self.run_id, params=new[i:i + 100])
        for k, v in params.items():
            if k in held and held[k] != str(v):
                client.set_tag(self.run_id, f"resumed_with.{k}", str(v))
        self.logged = {split: max((m.step for m in client.get_metric_history(self.run_id, f"{split}/loss")),
                                  default=0) for split in ("train", "val")}
        return {"run_id": self.run_id, "tracking_uri": uri}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def samples(self, step: int, samples: list[dict]) -> None:
        from PIL import Image
        folder = f"predictions/step_{step:07d}"
        table = {k: [s[k] for s in samples] for k in ("id", "question", "prediction", "reference", "correct")}
        table["image"] = [f"{folder}/{j}.png" if s["images"] else "" for j, s in enumerate(samples)]
        for j, s in enumerate(samples):
            for image in s["images"][:1]:
                self.client.log_image(self.run_id, Image.fromarray(image), artifact_file=table["image"][j])
        self.client.log_table(self.run_id, data=table, artifact_file=f"{folder}.json")

    def finish(self, artifacts: list[tuple[Path, str]], status: str) -> None:
        for f, folder in artifacts:
            self.client.log_artifact(self.run_id, str(f), folder or None)
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, out_dir: Path, project: str, run_name: str):
        self.folder = out_dir / "tensorboard"

    def start(self, params: dict, tags: dict, saved: dict | None, resumed_step: int) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        # readers drop the earlier events past the restored step: the resumed run logs those steps again
        self.writer = SummaryWriter(str(self.folder), purge_step=resumed_step + 1 if resumed_step else None)
        self.logged = None
        if not resumed_step:
            table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in {**tags, **params}.items())
            self.writer.add_text("config", table, 0)
        return {"log_dir": str(self.folder)}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("val/predictions", markdown_table(samples), step)
        for j, s in enumerate(samples):
            for image in s["images"][:1]:
                self.writer.add_image(f"val/sample_{j}/image", image, step, dataformats="HWC")
            for wave, rate, _ in s["audio"][:1]:
                self.writer.add_audio(f"val/sample_{j}/audio", wave[None], step, sample_rate=rate)
        self.writer.flush()

    def finish(self, artifacts: list[tuple[Path, str]], status: str) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, out_dir: Path, project: str, run_name: str):
        self.out_dir, self.project, self.run_name = out_dir, project, run_name

    def start(self, params: dict, tags: dict, saved: dict | None, resumed_step: int) -> dict:
        import wandb
        self.wandb = wandb
        run_id = saved["id"] if saved and resumed_step > 0 else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=self.project, name=self.run_name, id=run_id, resume="allow",
                              dir=str(self.out_dir), tags=[f"{k}={v}"[:64] for k, v in tags.items()])
        self.run.config.update(params, allow_val_change=True)
        past = self.run.starting_step - 1  # W&B ignores steps below the ones it holds
        self.logged = {"train": past, "val": past}
        return {"id": run_id}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def samples(self, step: int, samples: list[dict]) -> None:
        w = self.wandb
        raw_audio = importlib.util.find_spec("soundfile") is not None  # W&B encodes a waveform with it

        def audio(s: dict):  # a WAV file as it is; another clip as its waveform
            wave, rate, path = s["audio"][0] if s["audio"] else (None, 0, Path())
            if path.suffix.lower() == ".wav":
                return w.Audio(str(path))
            return w.Audio(wave, sample_rate=rate) if wave is not None and raw_audio else None
        rows = [[s["id"], s["question"], s["prediction"], s["reference"], s["correct"],
                 w.Image(s["images"][0]) if s["images"] else None, audio(s)] for s in samples]
        columns = ["id", "question", "prediction", "reference", "correct", "image", "audio"]
        self.run.log({"val/predictions": w.Table(columns=columns, data=rows)}, step=step)

    def finish(self, artifacts: list[tuple[Path, str]], status: str) -> None:
        if artifacts:
            art = self.wandb.Artifact("".join(c if c.isalnum() or c in "-_." else "-" for c in self.run_name)
                                      + "-run", type="model")
            for f, folder in artifacts:
                art.add_file(str(f), name=str(Path(folder) / f.name))
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if status != "crashed" else 1)
        self.wandb.teardown()  # waits for W&B's service to write the run's files whole


TRACKERS = {t.name: t for t in (MLflowTracker, TensorBoardTracker, WandbTracker)}  # as config.TRACKERS names


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An OSError at once, rather than a client's minutes of retries, when an http(s) tracking server does not
    answer on its port."""
    u = urlparse(uri)
    if u.scheme in ("http", "https") and u.hostname:
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        except OSError as e:
            raise OSError(f"cannot reach {uri} ({e.strerror or e})") from None


def markdown_table(samples: list[dict]) -> str:
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| id | question | prediction | reference | correct |", "|---|---|---|---|---|"]
    lines += [f"| {cell(s['id'])} | {cell(s['question'])} | {cell(s['prediction'])} | {cell(s['reference'])} | "
              f"{'yes' if s['correct'] else 'no'} |" for s in samples]
    return "\n".join(lines)


class Trackers:
    """The trackers a run names, fed from a queue by one thread. `log` only queues: it never waits and never
    raises. A tracker that fails is said once in one line and dropped."""

    def __init__(self, names: list[str], out_dir: Path, project: str = "mmlora", artifacts: str = "light",
                 say=print):
        self.names, self.out_dir, self.project, self.artifacts, self.say = (list(dict.fromkeys(names)), out_dir,
                                                                            project, artifacts, say)
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.started = threading.Event()  # set once each tracker started (or failed to)

    def start(self, params: dict, tags: dict, resumed_step: int) -> None:
        if self.names:
            self.thread = threading.Thread(target=self.work, args=(params, tags, resumed_step), daemon=True,
                                           name="mmlora-trackers")
            self.thread.start()

    def log(self, row: dict, samples: list[dict] | None = None) -> None:
        if self.thread is not None:
            self.queue.put(("row", row, samples))

    def close(self, artifacts: list[Path], status: str, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is queued, the artifacts (mode `artifacts`), the run's end; wait for it, `timeout` at most."""
        if self.thread is None:
            return
        self.queue.put(("close", artifacts, status))
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.say(f"trackers: still sending after {timeout:.0f} s; their runs may lack the last rows", flush=True)
        self.thread = None

    def work(self, params: dict, tags: dict, resumed_step: int) -> None:
        """The thread: start each tracker (continuing the run this folder's resume continues), then send each queued
        row to each tracker that still works, until `close`."""
        self.attempt(None, "run", lambda: self.serve(params, tags, resumed_step))
        self.started.set()

    def serve(self, params: dict, tags: dict, resumed_step: int) -> None:
        state_file = self.out_dir / "trackers.json"
        try:
            saved = json.loads(state_file.read_text()) if state_file.is_file() else {}
        except ValueError:
            saved = {}
        live = []
        for name in self.names:
            tracker = TRACKERS[name](self.out_dir, self.project, self.out_dir.resolve().name)
            if self.attempt(tracker, "start", lambda: saved.update({name: tracker.start(params, tags,
                                                                                        saved.get(name),
                                                                                        resumed_step)})):
                live.append(tracker)
        self.attempt(None, "save the trackers' run ids", lambda: write_json(state_file, saved))
        self.started.set()
        while True:
            kind, *item = self.queue.get()
            if kind == "close":
                files = artifact_files(item[0], self.artifacts)
                for tracker in live:
                    self.attempt(tracker, "finish", lambda: tracker.finish(files, item[1]))
                return
            row, samples = item
            for tracker in list(live):
                if tracker.logged is not None and row["step"] <= tracker.logged.get(row["split"], 0):
                    continue  # held since before the resume
                ok = self.attempt(tracker, "log", lambda: tracker.scalars(row["step"], scalars(row)))
                if ok and samples:
                    ok = self.attempt(tracker, "log", lambda: tracker.samples(row["step"], samples))
                if not ok:
                    live.remove(tracker)

    def attempt(self, tracker, what: str, fn) -> bool:
        """fn(); an exception is said in one line (the tracker is then dropped by the caller). True if it ran."""
        try:
            fn()
            return True
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0][:300]
            name = f"tracker {tracker.name}" if tracker else "the trackers"
            self.say(f"{name} stopped ({what}): {type(e).__name__}: {why}; metrics.csv/jsonl carry on", flush=True)
            return False


# ----------------------------------------------------------------------------------------------------------------
# Alerts and the heartbeat


def local_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


class Alerts:
    """Alerts on a sick run and the heartbeat file (see the module's docstring); all off where `enabled` is False
    (ranks other than 0). `spike`, `stall_s`, `slow` at 0 turn their alert off."""

    def __init__(self, command: str, spike: float, stall_s: float, slow: float, out_dir: Path, enabled: bool = True,
                 say=print):
        self.command, self.spike, self.stall_s, self.slow = command, spike, stall_s, slow
        self.out_dir, self.enabled, self.say = out_dir, enabled, say
        self.last: tuple[int, float] | None = None  # (step, time) of the last step: one reference, swapped whole
        self.fired: dict[str, float] = {}  # kind -> when it last fired
        self.average: float | None = None  # moving average of the logged losses
        self.speeds: list[float] = []  # logged tokens/s, sorted
        self.rows = 0
        self.commands: queue.Queue = queue.Queue()
        self.runner = self.watchdog = None
        self.closed = threading.Event()
        if not enabled:
            return
        self.heartbeat("starting")
        if command:
            self.runner = threading.Thread(target=self.run_commands, daemon=True, name="mmlora-alerts")
            self.runner.start()
        self.watchdog = threading.Thread(target=self.watch, daemon=True, name="mmlora-watchdog")
        self.watchdog.start()

    def beat(self, step: int) -> None:
        """Step `step` ended: what the watchdog and the heartbeat read."""
        self.last = (step, time.time())

    def check(self, row: dict) -> None:
        """A metrics row: a training row's loss against its moving average, its tokens/s against the run's median."""
        if not self.enabled or row.get("split") != "train":
            return
        loss, speed = row.get("loss"), next((v for k, v in row.items() if k.endswith("_per_s")), None)
        self.rows += 1
        judged = self.rows > MIN_ROWS
        if loss is not None and loss == loss:
            if judged and self.spike and loss > self.spike * self.average and loss > self.average + SPIKE_FLOOR:
                self.fire("spike", f"loss {loss:.4g} at step {row['step']} is {loss / self.average:.1f}x its moving "
                          f"average {self.average:.4g} (run.alert_spike = {self.spike:g})", row["step"], "warning")
            self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        if speed is not None:
            median = self.speeds[len(self.speeds) // 2] if self.speeds else None
            if judged and self.slow and speed < self.slow * median:
                self.fire("slow", f"{speed:,.0f}/s at step {row['step']} is {100 * speed / median:.0f}% of the "
                          f"run's median {median:,.0f}/s (run.alert_slow = {self.slow:g})", row["step"], "warning")
            bisect.insort(self.speeds, speed)

    def fire(self, kind: str, message: str, step: int | None, level: str = "error", **details) -> None:
        """Say the event in the log, and run the alert command on it (in the alerts' thread) unless an event of
        this kind was sent less than QUIET_S ago."""
        now = time.time()
        if not self.enabled:
            return
        self.say(f"alert {kind}: {message}", flush=True)
        if kind != "end" and now - self.fired.get(kind, -QUIET_S) < QUIET_S:
            return
        self.fired[kind] = now
        if self.runner is not None:
            self.commands.put({"event": kind, "level": level, "message": message, "step": step,
                               "time": local_time(now), "run_dir": str(self.out_dir.resolve()),
                               "host": socket.gethostname(), "pid": os.getpid(), **details})

    def run_commands(self) -> None:
        while (event := self.commands.get()) is not None:
            env = {**os.environ, "MMLORA_EVENT": event["event"], "MMLORA_LEVEL": event["level"],
                   "MMLORA_MESSAGE": event["message"], "MMLORA_STEP": str(event["step"]),
                   "MMLORA_RUN_DIR": event["run_dir"]}
            try:
                done = subprocess.run(self.command, shell=True, input=json.dumps(event), text=True, env=env,
                                      capture_output=True, timeout=ALERT_TIMEOUT)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or [""])[-1][:200]
                    self.say(f"alert command failed on {event['event']} (exit code {done.returncode}): {last}",
                             flush=True)
            except (OSError, subprocess.SubprocessError) as e:
                self.say(f"alert command failed on {event['event']}: {e}", flush=True)

    def watch(self) -> None:
        """The watchdog: every WATCH_S the heartbeat, when a step ended since, and a stall, once per stall."""
        written = stalled = None
        while not self.closed.wait(WATCH_S):
            last = self.last
            if last is not None and last != written:
                self.heartbeat("running")
                written = last
            if self.stall_s and last is not None and last != stalled and time.time() - last[1] > self.stall_s:
                stalled = last
                self.fire("stall", f"no step for {time.time() - last[1]:.0f} s: the last, step {last[0]}, ended at "
                          f"{local_time(last[1])} (run.alert_stall_s = {self.stall_s:g})", last[0])

    def heartbeat(self, status: str) -> None:
        step, t = self.last or (None, time.time())
        try:
            write_json(self.out_dir / "heartbeat.json", {"step": step, "time": local_time(t), "unix_time": t,
                                                           "status": status, "host": socket.gethostname(),
                                                           "pid": os.getpid()})
        except OSError as e:
            self.say(f"heartbeat: cannot write {self.out_dir / 'heartbeat.json'} ({e})", flush=True)

    def close(self, status: str, error: BaseException | None = None) -> None:
        """The run's end: the heartbeat's last word, the end event, and the alert commands waited for."""
        if not self.enabled:
            return
        self.closed.set()
        self.watchdog.join()
        self.heartbeat(status)
        step = self.last[0] if self.last else None
        why = f": {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}" if error is not None else ""
        when = f"at step {step}" if step is not None else "before its first step"
        self.fire("end", f"run {status} {when}{why}", step, "error" if status == "crashed" else "info",
                  status=status)
        if self.runner is not None:
            self.commands.put(None)
            self.runner.join(ALERT_TIMEOUT + 5)

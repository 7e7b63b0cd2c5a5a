"""generate.py on hostile input: every file it reads or writes, Ctrl-C and the chat's commands. Each case ends in
one line that names the file and what to do (exit code 2), a listed skip, or correct output, and nothing that
was there before is lost."""
import errno
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import cut_tokenizer, snapshot

import data
import generate
import lora
import multimodal
from checkpoint import CheckpointReadError, export, read_checkpoint


def run(args, capsys) -> tuple[int, str, str]:
    """generate.py's entry point in this process: (exit code, stdout, stderr)."""
    try:
        generate.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, expect):
    assert code == 2 and expect in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def val_copy(demo_dir, tmp_path):
    """The small demo's validation set and its media, copied: the tests may try to overwrite them."""
    shutil.copytree(demo_dir / "data" / "media", tmp_path / "media")
    shutil.copy(demo_dir / "data" / "val.jsonl", tmp_path / "val.jsonl")
    return tmp_path / "val.jsonl"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """An export folder of the trained run."""
    folder = tmp_path_factory.mktemp("export") / "export"
    m, _, cfg = generate.load_run(trained_run, device="cpu", dtype="float32")
    export(m, folder, cfg)
    return folder


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_out_that_names_an_input_is_refused_before_anything_is_written(trained_run, val_copy, tmp_path, capsys):
    before = val_copy.read_bytes()
    code, _, err = run(["--run", trained_run, "--predict", val_copy, "--out", val_copy], capsys)
    assert_one_line_error(code, err, "one of the files read")
    medium = next(iter((tmp_path / "media").glob("val-*.npy")))
    kept = medium.read_bytes()
    code, _, err = run(["--run", trained_run, "--predict", val_copy, "--out", medium], capsys)
    assert_one_line_error(code, err, "one of the files read")
    config = trained_run / "config.json"
    code, _, err = run(["--run", trained_run, "--predict", val_copy, "--out", config], capsys)
    assert_one_line_error(code, err, "one of the files read")
    assert val_copy.read_bytes() == before and medium.read_bytes() == kept and json.loads(config.read_text())


def test_resume_redoes_a_cut_last_line_and_names_any_other_bad_line(trained_run, val_copy, tmp_path, capsys):
    pred = tmp_path / "pred.jsonl"
    args = ["--run", trained_run, "--predict", val_copy, "--out", pred, "--batch_size", 4]
    assert run(args, capsys)[0] == 0
    whole, metrics = lines(pred), json.loads((tmp_path / "pred.metrics.json").read_text())
    pred.write_bytes(pred.read_bytes()[:-15])  # a kill while the last line was written
    code, _, err = run(args + ["--resume"], capsys)
    assert code == 0 and f"{pred}:12: the last line was cut short" in err, err
    assert sorted(r["id"] for r in lines(pred)) == sorted(r["id"] for r in whole) and len(whole) == 12
    again = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "timing"} == {k: v for k, v in metrics.items() if k != "timing"}
    text = pred.read_text().splitlines(keepends=True)
    pred.write_text("".join(text[:2] + ["{not json\n"] + text[3:]))
    code, _, err = run(args + ["--resume"], capsys)
    assert_one_line_error(code, err, f"{pred}:3: not a line of predictions")


def test_duplicate_ids_are_refused_where_ids_key_something(trained_run, val_copy, tmp_path, capsys,
                                                             monkeypatch):
    samples = [json.loads(x) for x in val_copy.read_text().splitlines()]
    samples[5]["id"] = samples[2]["id"]
    val_copy.write_text("".join(json.dumps(s) + "\n" for s in samples))
    with monkeypatch.context() as patched:  # the dataset is read and checked before the model loads
        patched.setattr(generate, "load_run", lambda *a, **k: pytest.fail("the model loaded before the check"))
        code, _, err = run(["--run", trained_run, "--predict", val_copy, "--out", tmp_path / "p.jsonl"], capsys)
    assert_one_line_error(code, err, f"{val_copy}:6: sample id {samples[2]['id']!r} is also the id of the sample "
                                     "on line 3")
    assert not (tmp_path / "p.jsonl").exists()
    # the feature cache is keyed by id too; training without one lists bad samples by file and line
    m, tok, cfg = generate.load_run(trained_run, device="cpu")
    ds = data.ConversationDataset(val_copy, tok, m.aligner.config, cfg.model.tokens_per_media, cfg.data.max_len)
    assert len(ds) == 12
    with pytest.raises(ValueError, match="val.jsonl:6: .*feature cache is keyed by sample id"):
        data.build_feature_cache(ds, m.aligner, tmp_path / "cache")


def test_export_into_a_file_or_a_foreign_folder_is_refused_and_an_export_is_replaced_whole(
        trained_run, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, _, err = run(["--run", trained_run, "--export", a_file], capsys)
    assert_one_line_error(code, err, "is a file")
    foreign = tmp_path / "work"
    foreign.mkdir()
    (foreign / "mmlora.txt").write_text("mine")
    code, _, err = run(["--run", trained_run, "--export", foreign], capsys)
    assert_one_line_error(code, err, "not an export folder")
    assert a_file.read_text() == "mine" and [p.name for p in foreign.iterdir()] == ["mmlora.txt"]
    out = tmp_path / "export"
    assert run(["--run", trained_run, "--export", out], capsys)[0] == 0
    (out / "stale.txt").write_text("of an older export")
    doc = (out / "mmlora.json").read_text()
    monkeypatch.setattr(lora, "save_adapter", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    code, _, err = run(["--run", trained_run, "--export", out], capsys)  # fails while writing: the old one stays
    assert_one_line_error(code, err, "No space left")
    assert (out / "stale.txt").is_file() and (out / "mmlora.json").read_text() == doc
    monkeypatch.undo()
    assert run(["--run", trained_run, "--export", out], capsys)[0] == 0  # replaced whole, not mixed
    assert not (out / "stale.txt").exists() and (out / "mmlora.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes.txt", "work"]  # no temporary folder left


@pytest.mark.parametrize("name", ["projectors.safetensors", "merged/model.safetensors", "aligner/aligner.safetensors"])
def test_a_cut_file_of_an_export_is_one_line_naming_it(exported, tmp_path, capsys, name):
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    f = folder / name
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    code, _, err = run(["--run", folder, "What?"], capsys)
    assert_one_line_error(code, err, f"{f}: not a readable safetensors file")
    assert "--export" in err


def test_a_cut_checkpoint_gives_generate_s_own_hint(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    ckpt = generate.checkpoint_folder(run_dir, "best")
    f = ckpt / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    code, _, err = run(["--run", run_dir, "What?"], capsys)
    assert_one_line_error(code, err, "checkpoint cannot be read")
    assert "--checkpoint" in err and "--train.resume" not in err


def test_ctrl_c_in_predict_says_where_the_predictions_are_and_resumes(trained_run, val_copy, tmp_path, capsys,
                                                                      monkeypatch):
    pred = tmp_path / "pred.jsonl"
    args = ["--run", trained_run, "--predict", val_copy, "--out", pred, "--batch_size", 4]
    calls = []
    real = multimodal.MultimodalLM.generate

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(multimodal.MultimodalLM, "generate", interrupted)
    code, _, err = run(args, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err and f"4 predictions are in {pred}" in last and "--resume" in last
    assert len(lines(pred)) == 4
    monkeypatch.undo()
    assert run(args + ["--resume"], capsys)[0] == 0
    ids = [r["id"] for r in lines(pred)]
    assert len(ids) == len(set(ids)) == 12


def test_an_interrupted_continuous_batch_keeps_its_finished_answers_and_resumes(trained_run, val_copy, tmp_path,
                                                                               monkeypatch):
    """--predict's decoder (continuous batching, run eagerly here) stopped by Ctrl-C as it takes in the second
    prompts: the answers that finished are in the file as whole lines, and `resume` answers the rest, each sample
    once, as the plain path answers them."""
    import decode
    m, tok, cfg = generate.load_run(trained_run, device="cpu")
    plain = generate.predict(m, tok, cfg, str(val_copy), tmp_path / "plain.jsonl", 4, 8, {}, False)
    decoder = decode.GraphDecoder(m.llm, steps=2, record=False, prepare=False)
    real, calls = decoder.admit, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(decoder, "admit", interrupted)
    pred = tmp_path / "pred.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate.predict(m, tok, cfg, str(val_copy), pred, 4, 8, {"decoder": decoder}, False)
    assert 0 < len(lines(pred)) < 12 and pred.read_text().endswith("\n")
    monkeypatch.undo()
    metrics = generate.predict(m, tok, cfg, str(val_copy), pred, 4, 8, {"decoder": decoder}, True)
    rows = lines(pred)
    assert len(rows) == len({r["id"] for r in rows}) == 12 and metrics["exact_match"] == plain["exact_match"]
    assert {r["id"]: r["prediction"] for r in rows} == {r["id"]: r["prediction"] for r in lines(tmp_path /
                                                                                                 "plain.jsonl")}


def test_chat_checks_media_when_attached_and_names_unknown_commands(trained_run, demo_dir, tmp_path, capsys,
                                                                    monkeypatch):
    good = next((demo_dir / "data" / "media").glob("val-*.npy"))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    script = (f"/image {bad}\n/audio {tmp_path / 'missing.wav'}\n/bogus\n/image {good}\nWhat colour is it?\n"
              "Which shape?\n/exit\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(["--run", trained_run, "--chat", "--max_new_tokens", 4], capsys)
    assert code == 0 and out.count("\n") == 2, (out, err)  # both questions answered, with the good image
    errors = err.strip().splitlines()[1:]  # after the chat's help line
    assert len(errors) == 3 and "Traceback" not in err, err
    assert f"{bad}: cannot decode image" in errors[0] and "not attached" in errors[0]
    assert "missing.wav: audio file not found" in errors[1] and "unknown command /bogus" in errors[2]

    class Interrupted(io.StringIO):
        def __iter__(self):
            raise KeyboardInterrupt
    monkeypatch.setattr(sys, "stdin", Interrupted())
    code, _, err = run(["--run", trained_run, "--chat"], capsys)
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("generate.py: stopped")


def test_a_checkpoint_read_error_keeps_train_s_hint_in_training(trained_run, tmp_path):
    """The same reader in train.py names train.py's options."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(generate.checkpoint_folder(trained_run, "best"), ckpt)
    (ckpt / "trainable.safetensors").write_bytes(b"cut")
    with pytest.raises(CheckpointReadError, match="--train.resume=PATH"):
        read_checkpoint(ckpt, "trainable.safetensors")


# -- What generate.py writes: never a file that a run or an export owns, nor any file read ----------------------


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    """A copy of the trained run (its checkpoints, metrics and export), for the tests that aim --out into it."""
    folder = tmp_path_factory.mktemp("run_copy") / "run"
    shutil.copytree(trained_run, folder)
    return folder


def no_model(monkeypatch):
    """Fails the test if the model loads: the checks must come first."""
    monkeypatch.setattr(generate, "load_run", lambda *a, **k: pytest.fail("the model loaded before the check"))


@pytest.mark.parametrize("target,owner", [("checkpoints/step_0000006/trainable.safetensors", "checkpoint folder"),
                                          ("metrics.jsonl", "run folder"),
                                          ("export/merged/model.safetensors", "export folder"),
                                          ("pred.jsonl", "run folder")])
def test_out_inside_a_run_checkpoint_or_export_folder_is_refused(run_copy, val_copy, capsys, monkeypatch, target,
                                                                 owner):
    """A checkpoint that was not the one loaded, the run's metrics, its export's weights, or a new file beside
    them: all belong to the run, and nothing there is written."""
    before = snapshot(run_copy)
    no_model(monkeypatch)
    code, _, err = run(["--run", run_copy, "--predict", val_copy, "--out", run_copy / target], capsys)
    assert_one_line_error(code, err, f"{run_copy / target}: lies in the {owner} ")
    assert snapshot(run_copy) == before


def test_out_that_is_a_hard_link_of_the_dataset_is_refused(run_copy, val_copy, tmp_path, capsys, monkeypatch):
    before = val_copy.read_bytes()
    link = tmp_path / "link.jsonl"
    os.link(val_copy, link)
    no_model(monkeypatch)
    code, _, err = run(["--run", run_copy, "--predict", val_copy, "--out", link], capsys)
    assert_one_line_error(code, err, f"{link}: this is one of the files read")
    assert val_copy.read_bytes() == before


def test_out_replaces_only_an_earlier_predictions_file(run_copy, val_copy, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"id": "mine", "text": "a dataset, not predictions"}\n')
    args = ["--run", run_copy, "--predict", val_copy, "--max_new_tokens", 2]
    code, _, err = run(args + ["--out", notes], capsys)
    assert_one_line_error(code, err, f"{notes}: is there and is not a predictions file")
    assert notes.read_text() == '{"id": "mine", "text": "a dataset, not predictions"}\n'
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"id": "old", "prediction": "x", "reference": "y", "media": {}}) + "\n")
    code, _, err = run(args + ["--out", pred], capsys)
    assert code == 0 and f"generate.py: {pred} holds earlier predictions, which these replace" in err, err
    assert len(lines(pred)) == 12 and "old" not in {r["id"] for r in lines(pred)}


def test_out_to_a_pipe_streams_the_lines_and_ends(run_copy, val_copy, tmp_path, capsys):
    """`--out /dev/stdout | cat`: the lines go through the pipe, the run ends without reading its output back,
    and no metrics file is written beside a stream."""
    import threading

    r, w = os.pipe()
    result = {}

    def predict():
        try:
            generate.main([str(a) for a in ["--run", run_copy, "--predict", val_copy, "--out", f"/dev/fd/{w}",
                                            "--max_new_tokens", 2]])
            result["code"] = 0
        except SystemExit as e:
            result["code"] = e.code
    t = threading.Thread(target=predict, daemon=True)
    t.start()
    t.join(120)
    os.close(w)
    assert not t.is_alive(), "generate.py hangs on its own pipe"
    with os.fdopen(r, "rb") as f:
        streamed = [json.loads(x) for x in f.read().splitlines()]
    assert result["code"] == 0 and len({x["id"] for x in streamed}) == 12
    assert "12 samples | exact match" in capsys.readouterr().out  # the summary, off the stream
    assert not list(tmp_path.glob("*.metrics.json")) and not Path(f"/dev/fd/{w}.metrics.json").exists()


def test_out_in_a_read_only_folder_is_one_line_before_the_model_loads(run_copy, val_copy, tmp_path, capsys,
                                                                      monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, flags, *a, **k):  # a read-only mount: nothing is created or written in `ro`
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    no_model(monkeypatch)
    code, _, err = run(["--run", run_copy, "--predict", val_copy, "--out", ro / "pred.jsonl"], capsys)
    assert_one_line_error(code, err, f"cannot write in {ro} (Read-only file system)")
    assert not any(ro.iterdir())


def test_a_full_disk_while_predicting_is_one_line_and_resume_completes(run_copy, val_copy, tmp_path, capsys,
                                                                       monkeypatch):
    pred = tmp_path / "pred.jsonl"
    real_write, writes = os.write, []

    def full_disk(fd, data):  # the second batch's lines find the disk full
        if os.readlink(f"/proc/self/fd/{fd}") == str(pred.resolve()):
            writes.append(len(data))
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full_disk)
    args = ["--run", run_copy, "--predict", val_copy, "--out", pred, "--batch_size", 4, "--max_new_tokens", 2]
    code, _, err = run(args, capsys)
    last = err.strip().splitlines()[-1]  # after the progress line of the first batch
    assert code == 2 and "Traceback" not in err and last.startswith(f"generate.py: cannot write {pred} (No space "
                                                                    f"left on device); 4 predictions are in {pred}; "
                                                                    "continue with: "), err
    assert last.endswith("--resume") and len(lines(pred)) == 4
    monkeypatch.undo()
    assert run(args + ["--resume"], capsys)[0] == 0
    assert len({r["id"] for r in lines(pred)}) == len(lines(pred)) == 12


@pytest.mark.parametrize("mode,option,value,expect", [
    ("question", "--max_new_tokens", -5, "--max_new_tokens -5: give 1 or more"),
    ("predict", "--max_new_tokens", -1, "--max_new_tokens -1: give 1 or more"),
    ("predict", "--max_new_tokens", 0, "--max_new_tokens 0: give 1 or more"),
    ("question", "--max_new_tokens", 0, "--max_new_tokens 0: give 1 or more"),
    ("predict", "--batch_size", -1, "--batch_size -1: give 1 or more"),
    ("predict", "--batch_tokens", -64, "--batch_tokens -64: give 1 or more"),
    ("predict", "--batch_tokens", 0, "--batch_tokens 0: give 1 or more"),
    ("predict", "--workers", -2, "--workers -2: give 0"),
    ("question", "--temperature", -1, "--temperature -1.0: give 0 (greedy) or more"),
    ("question", "--top_p", -0.5, "--top_p -0.5: give a value in (0, 1]"),
    ("question", "--top_k", -3, "--top_k -3: give 0 (every token) or more"),
    ("predict", "--max_new_tokens", 100000000, "--max_new_tokens 100000000: more than the model's context of 512"),
])
def test_every_option_is_checked_before_the_model_loads(run_copy, val_copy, tmp_path, capsys, monkeypatch, mode,
                                                        option, value, expect):
    no_model(monkeypatch)
    task = ["What is two plus three?"] if mode == "question" else ["--predict", val_copy, "--out",
                                                                    tmp_path / "p.jsonl"]
    code, _, err = run(["--run", run_copy, *task, option, value], capsys)
    assert_one_line_error(code, err, expect)
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_checks_each_prompt_against_the_context_as_one_question_does(run_copy, val_copy, tmp_path, capsys,
                                                                            monkeypatch):
    no_model(monkeypatch)
    code, _, err = run(["--run", run_copy, "--predict", val_copy, "--out", tmp_path / "p.jsonl", "--max_new_tokens",
                        500], capsys)
    assert_one_line_error(code, err, "tokens and --max_new_tokens asks for 500 more, more than the model's context "
                                     "of 512; lower --max_new_tokens to")
    assert f"{val_copy}:" in err and not (tmp_path / "p.jsonl").exists()


def test_export_into_the_current_folder_or_one_that_cannot_be_renamed(run_copy, tmp_path, capsys, monkeypatch):
    """`--export .`: refused before loading (the current folder cannot be swapped for another); a folder the
    system refuses to rename (a mount point: EBUSY) is one line, and no temporary folder is left."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    no_model(monkeypatch)
    code, _, err = run(["--run", run_copy, "--export", "."], capsys)
    assert_one_line_error(code, err, ".: is the current folder (or holds it)")
    assert not any(here.iterdir())
    monkeypatch.undo()
    out = tmp_path / "mount"
    out.mkdir()
    real_rename = Path.rename

    def busy(self, target):
        if self == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real_rename(self, target)
    (out / "mmlora.json").write_text("{}")  # an export there already, which is to be replaced
    monkeypatch.setattr(Path, "rename", busy)
    code, _, err = run(["--run", run_copy, "--export", out], capsys)
    assert_one_line_error(code, err, f"cannot put {out} in place ([Errno 16] Device or resource busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "mount"]
    assert [p.name for p in out.iterdir()] == ["mmlora.json"]


def test_export_on_a_full_disk_is_one_line_and_keeps_the_export_there(exported, tmp_path, trained_run, capsys,
                                                                       monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "export"
    shutil.copytree(exported, out)
    before = snapshot(out)

    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, _, err = run(["--run", trained_run, "--export", out], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: Error while serializing")
    assert "No space left on device" in err and "An export folder already there is intact" in err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_killed_export_s_temporary_folder_is_removed_at_the_next(run_copy, tmp_path, capsys):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID is free: the writer of the leftover is dead
    left = tmp_path / f".tmp-exp-{gone.pid}"
    (left / "merged").mkdir(parents=True)
    (left / "merged" / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".tmp-exp-{os.getppid()}"  # a writer still at work (a live PID) keeps its folder
    live.mkdir()
    code, out, _ = run(["--run", run_copy, "--export", tmp_path / "exp"], capsys)
    assert code == 0 and f"removed {left}, left half-written by a stopped process (pid {gone.pid})" in out
    assert not left.exists() and live.is_dir() and (tmp_path / "exp" / "mmlora.json").is_file()


def test_a_cut_tokenizer_of_a_run_is_one_line_naming_it(run_copy, tmp_path, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(run_copy, run_dir, ignore=shutil.ignore_patterns("export"))
    tok = cut_tokenizer(config["model"]["llm"], tmp_path / "llm")
    config["model"]["llm"] = str(tmp_path / "llm")
    (run_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run(["--run", run_dir, "What?"], capsys)
    assert_one_line_error(code, err, f"{tok}: not a readable tokenizer")


def test_a_cut_tokenizer_of_an_export_is_one_line_naming_it(exported, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    tok = folder / "merged" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:200])
    code, _, err = run(["--run", folder, "What?"], capsys)
    assert_one_line_error(code, err, f"{tok}: not a readable tokenizer")
    assert "--export" in err

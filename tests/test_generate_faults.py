"""generate.py on hostile input: every file it reads or writes, Ctrl-C and the chat's commands. Each case ends in
one line that names the file and what to do (exit code 2), a listed skip, or correct output, and nothing that
was there before is lost."""
import io
import json
import shutil
import sys

import pytest

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

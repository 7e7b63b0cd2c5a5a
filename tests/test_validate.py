"""validate.py passes on a working setup and turns the right check red on a broken one."""
import json

import pytest
from conftest import align_config, demo_config

import build
import model
import validate


def results(cfg, quick=True):
    return {r["check"]: r for r in validate.validate(cfg, quick)}


@pytest.mark.parametrize("model_keys,speedup", [
    ({}, {"compile": "default", "cuda_graph": True}),
    # QLoRA as configs/qwen2.5-7b-qlora.toml runs it: an NF4 base, its checkpointed layers' inputs offloaded
    ({"quantize": "nf4"}, {"compile": "none", "activation_checkpointing": True, "offload_activations": True})])
def test_all_checks_pass_on_the_demo(demo_dir, tmp_path, capsys, monkeypatch, model_keys, speedup):
    cfg = demo_config(demo_dir, tmp_path, model=model_keys, train=speedup)
    if not model_keys:  # 2 ranks run once here, on the NF4 base (plain ranks: tests/test_train.py's signal test)
        monkeypatch.setattr(validate, "distributed", lambda s, ds: "2 ranks: run on the NF4 base")
    compiled = []
    monkeypatch.setattr(model.DecoderLayer, "compile", lambda self, **kw: compiled.append(kw))
    res = results(cfg)
    assert list(res) == ["Configuration", "Model initialization", "Parameter freezing", "Data pipeline", "Forward pass",
                         "Training step", "Checkpoint saving", "Metrics logging", "Short training run",
                         "Distributed", "Resume"]
    assert all(r["passed"] for r in res.values()), {n: r["detail"] for n, r in res.items() if not r["passed"]}
    assert not compiled and "checked eager" in res["Configuration"]["detail"]  # the checks run the layers eager
    assert {k: getattr(cfg.train, k) for k in speedup} == speedup  # and leave the caller's config as it was


def test_all_checks_pass_for_phase1(demo_dir, tmp_path, monkeypatch):
    # Phase 1 on 2 ranks: tests/test_align.py's two-rank test
    monkeypatch.setattr(validate, "distributed", lambda s, ds: "2 ranks: tests/test_align.py")
    res = results(align_config(demo_dir, tmp_path))
    assert all(r["passed"] for r in res.values()), {n: r["detail"] for n, r in res.items() if not r["passed"]}
    assert "Phase 1" in res["Configuration"]["detail"] and "pairs" in res["Data pipeline"]["detail"]


def test_cli_exit_code_and_json(demo_dir, tmp_path):
    out = tmp_path / "r.json"
    code = validate.main(["--config", "/nonexistent.toml", "--json", str(out)])
    assert code == 1 and json.loads(out.read_text())[0]["check"] == "Configuration"


def broken(demo_dir, tmp_path, what, monkeypatch):
    cfg = demo_config(demo_dir, tmp_path / "run")
    if what == "lora target":
        cfg.lora.targets = "q_proj,qkv_proj"
        return cfg, "Model initialization", "match no linear layer"
    if what == "trainable aligner":
        real = build.load_aligner
        monkeypatch.setattr(build, "load_aligner", lambda *a, **k: real(*a, **k).requires_grad_(True))
        return cfg, "Parameter freezing", "parameters of the aligner are trainable"
    if what == "no supervision":
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}) + "\n")
        cfg.data.train_file = str(path)
        return cfg, "Data pipeline", "no supervised tokens"
    if what == "unwritable checkpoints":
        (tmp_path / "file").write_text("not a folder")
        cfg.run.out_dir = str(tmp_path / "file" / "run")
        return cfg, "Checkpoint saving", "cannot write a checkpoint"


@pytest.mark.parametrize("what", ["lora target", "trainable aligner", "no supervision", "unwritable checkpoints"])
def test_broken_setup_turns_its_check_red(demo_dir, tmp_path, monkeypatch, what):
    cfg, check, reason = broken(demo_dir, tmp_path, what, monkeypatch)
    monkeypatch.setattr(validate, "distributed", lambda s, ds: "skipped in this test")
    monkeypatch.setattr(validate, "resume", lambda s, ds: "skipped in this test")
    res = results(cfg)
    assert not res[check]["passed"] and reason in res[check]["detail"], res[check]
    assert res[check]["fix"]
    earlier = list(res)[:list(res).index(check)]
    assert all(res[n]["passed"] for n in earlier if n != "Metrics logging")

"""Phase 1 (train.phase = "align"): the contrastive loss against a direct computation, negatives from all ranks,
recall@k, the pair data and its errors, exact resume, and Phase 2 on Phase 1's aligner."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, align_config, cli_args, demo_config, final_weights, rows, torchrun

import align
import data
import generate
import build
import train
from tokenizer import load_tokenizer
from encoders import load_aligner
from distributed import World


def direct_infonce(left, right, kind, scale):
    """Symmetric InfoNCE written out, kind by kind: (loss of each pair,)."""
    out = torch.zeros(len(kind))
    for k in kind.unique():
        idx = (kind == k).nonzero()[:, 0]
        logits = scale * left[idx] @ right[idx].T  # (n, n): pair i's right side is column i
        target = torch.arange(len(idx))
        out[idx] = (F.cross_entropy(logits, target, reduction="none")
                    + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return out


def test_infonce_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    left = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    right = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    kind = torch.tensor([0, 0, 1, 0, 2, 1, 1, 0, 2, 2])
    got = align.contrastive_loss(left, right, kind, torch.tensor(7.0))
    torch.testing.assert_close(got, direct_infonce(left, right, kind, 7.0), rtol=1e-6, atol=1e-6)
    aligned = align.contrastive_loss(left, left.clone(), kind, torch.tensor(50.0))
    assert aligned.max() < got.min()  # matching sides give a lower loss


def test_recall_at_k_on_a_known_case():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # query 0: right (0) first
                        [0.8, 0.5, 0.1],   # query 1: right (1) second
                        [0.7, 0.6, 0.1]])  # query 2: right (2) third
    r = align.recall_at_k(sim, torch.eye(3, dtype=torch.bool), ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    # two images with one caption: both captions right for either image
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    keys = [("a.png", "a red circle"), ("b.png", "a blue square"), ("c.png", "a red circle")]
    m = align.retrieval_metrics(emb, emb, torch.zeros(3, dtype=torch.long), keys)
    assert m["r1_image_text"] == 1.0 and m["r1_text_image"] == 1.0
    keys_unique = [("a.png", "one"), ("b.png", "two"), ("c.png", "three")]
    m = align.retrieval_metrics(emb, emb, torch.zeros(3, dtype=torch.long), keys_unique)
    assert m["r1_image_text"] == pytest.approx(2 / 3)  # a and c tie: one of them finds the other's caption


def test_pair_dataset_collates_each_kind(demo_dir):
    cfg = align_config(demo_dir, demo_dir / "unused")
    tok = load_tokenizer(cfg.model.llm, "chatml")
    ds = data.PairDataset(cfg.data.train_file, tok, load_aligner(cfg.model.aligner).config, 32)
    kinds = [ex.kind for ex in ds.examples]
    assert set(kinds) == {0, 1, 2}
    items = [ds[i] for i in range(len(ds))]
    b = data.collate_pairs(items, tok.pad_id)
    n_img, n_aud = (sum(1 for it in items if m in it.media) for m in ("image", "audio"))
    assert b.media["image"].shape[0] == n_img and b.media["audio"].shape[0] == n_aud
    # each pair's sides index the stack [images; clips; texts] at its own media
    stack = [("image", i) for i, it in enumerate(items) if "image" in it.media] + \
            [("audio", i) for i, it in enumerate(items) if "audio" in it.media] + \
            [("text", i) for i, it in enumerate(items) if it.text_ids is not None]
    for i, it in enumerate(items):
        a, c = data.PAIR_KINDS[it.kind]
        assert stack[b.left[i]] == (a, i) and stack[b.right[i]] == (c, i)
    t = b.text_ids[b.right[kinds.index(0)] - n_img - n_aud]
    assert t[:len(items[kinds.index(0)].text_ids)].tolist() == items[kinds.index(0)].text_ids


def write_pairs(folder, records):
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_pairs_obey_on_error(demo_dir, tmp_path):
    src = demo_dir / "data" / "media"
    (tmp_path / "media").mkdir()
    img = next(src.glob("pair-train-*.npy"))
    shutil.copy(img, tmp_path / "media" / "a.npy")
    (tmp_path / "media" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    records = [{"image": "media/a.npy", "text": "a red circle"},
               {"image": "media/missing.npy", "text": "gone"},          # line 2: missing file
               {"image": "media/a.npy", "audio": "media/a.npy", "text": "three"},  # line 3: three sides
               {"audio": "media/broken.wav", "text": "noise"},          # line 4: undecodable clip
               {"text": "alone"}]                                       # line 5: one side
    path = write_pairs(tmp_path, records)
    tok = load_tokenizer(demo_dir / "llm", "chatml")
    acfg = load_aligner(demo_dir / "aligner-init").config
    with pytest.raises(data.SampleError, match=r"pairs.jsonl:2: .*missing.npy not found"):
        data.PairDataset(path, tok, acfg, 32)
    ds = data.PairDataset(path, tok, acfg, 32, on_error="skip")
    assert len(ds) == 1
    reasons = {s["line"]: s["reason"] for s in ds.skipped}
    assert sorted(reasons) == [2, 3, 4, 5]
    assert "exactly two" in reasons[3] and "cannot decode audio" in reasons[4] and "has text" in reasons[5]


def test_pair_that_fails_mid_training_is_skipped_and_listed(demo_dir, tmp_path):
    """A clip whose header reads but whose samples hold NaN: found only when decoded, in training."""
    folder = tmp_path / "d"
    (folder / "media").mkdir(parents=True)
    lines = (demo_dir / "data" / "pairs_train.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    for r in records:
        for m in ("image", "audio"):
            if m in r:
                shutil.copy(demo_dir / "data" / r[m], folder / r[m])
    bad = next(i for i, r in enumerate(records) if "audio" in r)
    np.save(folder / "media" / "nan.npy", np.full(16000, np.nan, np.float32))
    records[bad]["audio"] = "media/nan.npy"
    path = write_pairs(folder, records)
    cfg = align_config(demo_dir, tmp_path / "run", data={"train_file": str(path), "val_file": "",
                                                         "on_error": "skip"}, train={"max_steps": 10})
    train.fit(cfg)
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [bad + 1] and "NaN" in skipped[0]["reason"]
    assert (tmp_path / "run" / "aligner" / "aligner.safetensors").is_file()


def test_phase1_learns_and_writes_an_aligner_phase2_loads(demo_dir, tmp_path):
    cfg = align_config(demo_dir, tmp_path / "p1", train={"max_steps": 12, "eval_every": 12})
    before = load_aligner(cfg.model.aligner).state_dict()
    train.fit(cfg)
    val = rows(tmp_path / "p1", "val")[-1]
    assert {"r1_image_text", "r5_text_audio", "loss_image_audio"} <= val.keys()
    folder = tmp_path / "p1" / "aligner"
    after = load_aligner(folder)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".head." in k for k in changed) and any(".encoder." in k for k in changed)
    assert all(not p.requires_grad for p in after.parameters())
    # the heads and encoders of the last checkpoint are the aligner's
    w = final_weights(tmp_path / "p1")
    torch.testing.assert_close(after.state_dict()["image.head.weight"], w["aligner.image.head.weight"])
    # Phase 2 takes the aligner folder, or the Phase-1 run's folder, as model.aligner, and builds its feature cache
    # from either: training from the cache gives the losses of training from raw media
    losses = {}
    for aligner, cache in ((folder, ""), (tmp_path / "p1", str(tmp_path / "cache"))):
        out = tmp_path / f"p2-{aligner.name}"
        cfg = demo_config(demo_dir, out, model={"aligner": str(aligner)}, lora={"dropout": 0.0},
                          data={"feature_cache": cache}, train={"max_steps": 2})
        if cache:
            train.build_cache(cfg)
        train.fit(cfg)
        losses[cache] = [r["loss"] for r in rows(out)]
    assert len(losses[""]) == 2 and losses[str(tmp_path / "cache")] == pytest.approx(losses[""], rel=1e-5)
    with pytest.raises(ValueError, match="is a Phase-1 run"):
        generate.load_run(tmp_path / "p1")


def test_phase1_resume_is_exact(demo_dir, tmp_path):
    straight = align_config(demo_dir, tmp_path / "a", train={"max_steps": 6, "save_every": 3})
    train.fit(straight)
    cut = align_config(demo_dir, tmp_path / "b", train={"max_steps": 3, "save_every": 3})
    train.fit(cut)
    train.fit(align_config(demo_dir, tmp_path / "b", train={"max_steps": 6, "save_every": 3}))
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and "logit_scale" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_ranks_give_the_losses_and_gradients_of_one(demo_dir, tmp_path):
    """Negatives from all ranks: 2 gloo ranks x 3 pairs give the gradients, and train with the losses, of 1 rank x
    6 pairs."""
    cfg = align_config(demo_dir, tmp_path / "unused")
    res = torchrun(cli_args(cfg), 2, script=ROOT / "tests" / "grad_driver.py",
                   env={"GLOBAL": "6", "GRADS_OUT": str(tmp_path / "2.pt")})
    assert res.returncode == 0, res.stderr[-3000:]
    world = World()  # 1 rank, in this process: the driver's step on all 6 pairs
    tokenizer, model = build.build_model(cfg, world.device)
    ds = train.make_dataset(cfg, cfg.data.train_file, tokenizer, model.aligner)
    scaler, autocast = train.mixed_precision(cfg.train, world.device)
    train.forward_backward(model, [data.collate_pairs([ds[i] for i in range(6)], tokenizer.pad_id)], scaler,
                           autocast, world)
    g1 = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    g2 = torch.load(tmp_path / "2.pt")
    assert g1.keys() == g2.keys() and "logit_scale" in g1 and "text_head.weight" in g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-5 * max(1.0, g1[k].abs().max().item()))
    assert g1["aligner.image.head.weight"].abs().sum() > 0

    one = align_config(demo_dir, tmp_path / "one", train={"max_steps": 4, "batch_size": 6})
    train.fit(one)
    two = align_config(demo_dir, tmp_path / "two", train={"max_steps": 4, "batch_size": 3})
    res = torchrun(cli_args(two), 2)
    assert res.returncode == 0, res.stderr[-3000:]
    la, lb = [r["loss"] for r in rows(tmp_path / "one")], [r["loss"] for r in rows(tmp_path / "two")]
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)


def test_phase1_config_errors(demo_dir, tmp_path):
    with pytest.raises(ValueError, match="feature_cache"):
        align_config(demo_dir, tmp_path, data={"feature_cache": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="shared_projector.*must be equal"):
        demo_config(demo_dir, tmp_path, model={"shared_projector": True, "image_tokens": 4, "audio_tokens": 8})


def test_a_bad_pair_stops_train_py_with_one_line(demo_dir, tmp_path, capsys):
    path = write_pairs(tmp_path, [{"image": "missing.npy", "text": "a red circle"}])
    cfg = align_config(demo_dir, tmp_path / "run", data={"train_file": str(path), "val_file": ""})
    with pytest.raises(SystemExit) as e:
        train.main(cli_args(cfg))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {path}:1: ") and "missing.npy not found" in err

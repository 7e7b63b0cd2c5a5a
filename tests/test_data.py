"""The data pipeline: media decoding, labels, placeholders, splicing, packing, the feature cache, bad input."""
import dataclasses
import hashlib
import json
import re
import shutil
import wave

import numpy as np
import pytest
import torch
from conftest import demo_config

import data

import media
import demo
import build
import train
from tokenizer import load_tokenizer
from multimodal import MODALITIES, MultimodalLM, document_block_mask


def write_wav(path, samples: np.ndarray, rate: int, width: int, channels: int = 1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_decoding_across_depths_and_channels(tmp_path, width, channels):
    rng = np.random.default_rng(width * 10 + channels)
    x = rng.uniform(-0.9, 0.9, (800, channels))  # the signal in [-1, 1]
    bits = 8 * width
    q = np.round(x * (2 ** (bits - 1) - 1)).astype(np.int64)
    if width == 1:
        raw = (q + 128).astype(np.uint8)
    elif width == 3:
        u = q & 0xFFFFFF
        raw = np.stack([(u >> (8 * i)) & 0xFF for i in range(3)], -1).astype(np.uint8)
    else:
        raw = q.astype({2: "<i2", 4: "<i4"}[width])
    write_wav(tmp_path / "a.wav", raw, 16000, width, channels)
    out = media.load_audio(tmp_path / "a.wav", 16000)
    assert out.dtype == torch.float32 and out.shape == (800,)
    np.testing.assert_allclose(out.numpy(), x.mean(1), atol=2.0 / 2 ** (bits - 1) + 1e-6)


def test_wav_is_resampled_to_the_aligner_rate(tmp_path):
    t = np.arange(8000) / 8000
    write_wav(tmp_path / "a.wav", (np.sin(2 * np.pi * 200 * t) * 20000).astype(np.int16), 8000, 2)
    out = media.load_audio(tmp_path / "a.wav", 16000)
    assert out.shape == (16000,)
    ref = np.sin(2 * np.pi * 200 * np.arange(16000) / 16000) * 20000 / 32768
    assert np.abs(out.numpy()[100:-100] - ref[100:-100]).max() < 0.02


def test_images_from_npy_and_png(tmp_path):
    from PIL import Image
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", img)
    Image.fromarray(img).save(tmp_path / "a.png")
    for f in ("a.npy", "a.png"):
        out = media.load_image(tmp_path / f)
        assert out.dtype == torch.uint8 and out.shape == (3, 20, 30)
        assert torch.equal(out, torch.from_numpy(img).permute(2, 0, 1))


@pytest.mark.parametrize("fmt", ["chatml", "qwen2.5", "qwen3", "llama3", "mistral", "plain"])
def test_labels_cover_exactly_the_replies(tokenizer_dir, fmt):
    tok = load_tokenizer(tokenizer_dir, chat_format=fmt)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is shown?"},
            {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "Count the beeps."},
            {"role": "assistant", "content": "Three."}]
    ids, labels, counts = data.encode_conversation(msgs, tok, {"image": 3, "audio": 2}, 512, False)
    assert counts == {"image": 1}
    assert ids.count(tok.media_token_id("image")) == 3
    targets = [x for x in labels if x != -100]
    eot = tok.end_of_turn_id
    assert targets.count(eot) == 2 and targets[-1] == eot
    replies = tok.decode([x for x in targets if x != eot])
    assert replies.replace(" ", "") == "Aredcircle.Three."
    # labels are shifted: labels[t] is the token at t+1
    assert all(labels[t] in (-100, ids[t + 1]) for t in range(len(ids) - 1))


def test_truncation_never_cuts_a_media_block(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, chat_format="chatml")
    msgs = [{"role": "user", "content": "Look: <image> and <image>"}, {"role": "assistant", "content": "Two images."}]
    full, _, _ = data.encode_conversation(msgs, tok, {"image": 8}, 512, False)
    img = tok.media_token_id("image")
    second = [i for i, x in enumerate(full) if x == img][8]  # first token of the second block
    ids, labels, counts = data.encode_conversation(msgs, tok, {"image": 8}, second + 3, True)
    assert counts == {"image": 1} and len(ids) == second and ids.count(img) == 8
    with pytest.raises(ValueError, match="longer than data.max_len"):
        data.encode_conversation(msgs, tok, {"image": 8}, second + 3, False)


def write_dataset(folder, samples, demo_dir, name="d.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_dir / "data" / "media", folder / "media", dirs_exist_ok=True)
    path = folder / name
    path.write_text("".join(s if isinstance(s, str) else json.dumps(s) + "\n" for s in samples))
    return path


BAD = {
    "missing media": ({"id": "m", "image": "media/nope.npy", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "not found"),
    "undecodable media": ({"id": "u", "audio": "media/broken.wav", "conversations": [
        {"from": "human", "value": "<audio>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "cannot decode audio"),
    "placeholder count": ({"id": "p", "image": ["media/train-00001.npy"], "conversations": [
        {"from": "human", "value": "<image><image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        "2 <image> placeholders but 1 image"),
    "no supervision": ({"id": "z", "conversations": [{"from": "human", "value": "Hello?"}]}, "no supervised tokens"),
    "broken json": ('{"id": "j", "conversations": [\n', "not valid UTF-8 JSON"),
    "unknown role": ({"id": "r", "messages": [{"role": "robot", "content": "beep"}]}, "unknown role 'robot'"),
    "too long": ({"id": "l", "conversations": [{"from": "human", "value": "word " * 400},
                                               {"from": "gpt", "value": "x"}]}, "longer than data.max_len"),
    "escaping path": ({"id": "e", "image": "../outside.npy", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "leaves the data folder"),
    "placeholder in a reply": ({"id": "a", "image": "media/train-00001.npy", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image> this"}]},
        "a media placeholder in an assistant reply"),
    "folder as medium": ({"id": "f", "image": "media", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "is a folder; give a file"),
    "empty WAV": ({"id": "w", "audio": "media/empty.wav", "conversations": [
        {"from": "human", "value": "<audio>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        "the file is empty (0 bytes)"),
    "truncated WAV": ({"id": "t", "audio": "media/short.wav", "conversations": [
        {"from": "human", "value": "<audio>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        "the header promises 3200 bytes"),
    "float image array": ({"id": "i", "image": "media/float.npy", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "an image .npy holds"),
    "rank-3 audio array": ({"id": "r3", "audio": "media/cube.npy", "conversations": [
        {"from": "human", "value": "<audio>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "an audio .npy holds"),
}
GOOD = {"id": "g", "conversations": [{"from": "human", "value": "What is one plus one?"},
                                     {"from": "gpt", "value": "two"}]}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_samples_raise_or_are_skipped(tmp_path, demo_dir, case):
    sample, reason = BAD[case]
    (tmp_path / "ds" / "media").mkdir(parents=True)
    path = write_dataset(tmp_path / "ds", [GOOD, sample], demo_dir)
    media = tmp_path / "ds" / "media"
    (media / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    (media / "empty.wav").write_bytes(b"")
    write_wav(media / "short.wav", np.zeros(1600, np.int16), 16000, 2)
    (media / "short.wav").write_bytes((media / "short.wav").read_bytes()[:-101])  # an odd length, cut short
    np.save(media / "float.npy", np.zeros((8, 8, 3), np.float32))
    np.save(media / "cube.npy", np.zeros((2, 2, 100), np.float32))
    np.save(tmp_path / "outside.npy", np.zeros((4, 4, 3), np.uint8))
    tok = load_tokenizer(demo_dir / "llm", chat_format="chatml")
    from encoders import load_aligner
    acfg = load_aligner(demo_dir / "aligner-init").config
    kw = dict(tokens_per_media={"image": 16, "audio": 8}, max_len=128)
    with pytest.raises(data.SampleError, match=re.escape(reason)) as e:
        data.ConversationDataset(path, tok, acfg, on_error="raise", **kw)
    assert str(path) in str(e.value) and ":2:" in str(e.value)  # file and line
    ds = data.ConversationDataset(path, tok, acfg, on_error="skip", **kw)
    assert len(ds) == 1 and ds.examples[0].id == "g"
    assert len(ds.skipped) == 1 and reason in ds.skipped[0]["reason"] and ds.skipped[0]["line"] == 2


def test_skipped_samples_are_written_and_counted(tmp_path, demo_dir):
    path = write_dataset(tmp_path / "ds", [GOOD, BAD["unknown role"][0], GOOD], demo_dir)
    cfg = demo_config(demo_dir, tmp_path / "run", data={"train_file": str(path), "val_file": "", "on_error": "skip"},
                      train={"max_steps": 1, "batch_size": 2})
    train.fit(cfg)
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["r"] and "unknown role" in skipped[0]["reason"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_samples"] == 1


def model_and_data(demo_dir, tmp_path, **kw):
    cfg = demo_config(demo_dir, tmp_path, **kw)
    tok, mm = build.build_model(cfg, torch.device("cpu"))
    ds = data.ConversationDataset(cfg.data.train_file, tok, mm.aligner.config, {"image": 16, "audio": 8}, 128,
                                  feature_cache=train.cache_folder(cfg, cfg.data.train_file))
    return cfg, tok, mm, ds


def test_splicing_puts_each_feature_at_its_placeholder(demo_dir, tmp_path):
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    items = [ds[i] for i in range(8)]
    batch = data.collate(items, tok.pad_id)
    x = mm.embed(batch)
    for m in MODALITIES:
        feats = mm.media_embeds(batch, m)  # (M, K, H)
        slots = (batch.input_ids == mm.media_token_ids[m]).nonzero().tolist()
        assert len(slots) == feats.shape[0] * feats.shape[1] > 0
        assert batch.media[m].slots.tolist() == [b * batch.input_ids.shape[1] + t for b, t in slots]
        for n, (b, t) in enumerate(slots):
            assert torch.equal(x[b, t], feats.flatten(0, 1)[n])
    text = batch.input_ids != mm.media_token_ids["image"]
    text &= batch.input_ids != mm.media_token_ids["audio"]
    assert torch.equal(x[text], mm.llm.model.embed_tokens(batch.input_ids)[text])


def test_batches_joined_equal_one_collated_batch(demo_dir, tmp_path):
    """concat_batches (the parts of a --predict batch, decoded by several workers) gives collate's batch of all
    their samples, field by field, whatever the parts' widths; packed rows are refused."""
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    items = sorted((ds[i] for i in range(10)), key=lambda it: -len(it.input_ids))
    parts = [data.collate(items[a:b], tok.pad_id) for a, b in ((0, 3), (3, 4), (4, 10))]
    assert len({p.input_ids.shape[1] for p in parts}) == 3
    joined, whole = data.concat_batches(parts, tok.pad_id), data.collate(items, tok.pad_id)
    for f in dataclasses.fields(data.Batch):
        a, b = getattr(joined, f.name), getattr(whole, f.name)
        if f.name == "media":
            assert a.keys() == b.keys() and set(a) == set(MODALITIES)
            for m in a:
                for x, y in zip(dataclasses.astuple(a[m]), dataclasses.astuple(b[m])):
                    assert (x is None and y is None) or torch.equal(x, y), (m, x, y)
        else:
            assert torch.equal(a, b) if torch.is_tensor(a) else a == b, f.name
    with pytest.raises(ValueError, match="packed"):
        data.concat_batches([data.collate(items, tok.pad_id, pack=True, max_len=256)] * 2, tok.pad_id)


def test_media_that_do_not_match_their_placeholders_are_a_clear_error(demo_dir, tmp_path):
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    batch = data.collate([ds[i] for i in range(8)], tok.pad_id)
    audio = batch.media["audio"]
    with pytest.raises(ValueError, match=r"placeholder tokens for \d+ audio inputs"):
        mm(dataclasses.replace(batch, media={**batch.media, "audio": dataclasses.replace(audio, raw=audio.raw[1:])}))


def test_document_block_mask_matches_flex_attentions_own():
    """The block mask read off each block's first and last sample equals create_block_mask's, which evaluates the
    document mask at every position: the same partial and full blocks, for rows of many sample lengths ending in
    padding or not."""
    from torch.nn.attention.flex_attention import create_block_mask
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        rows = []
        for _ in range(3):
            row, filled = [], 512 - int(torch.randint(0, 200, (1,), generator=g)) * (trial % 2)
            while len(row) < filled:
                row += [len(set(row))] * min(filled - len(row), int(torch.randint(1, 300, (1,), generator=g)))
            rows.append(row + [-1] * (512 - len(row)))
        doc = torch.tensor(rows)
        ref = create_block_mask(lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv), 3, None, 512, 512,
                                device="cpu")
        ours = document_block_mask(doc)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_packed_and_unpacked_give_the_same_per_sample_losses(demo_dir, tmp_path):
    """Packed rows with the dense document mask, and with flex attention's block mask (what compiled layers on a
    GPU use in train mode), give each sample the loss it has alone in a padded row."""
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path, lora={"dropout": 0.0})  # train mode below: no dropout
    mm.eval()
    items = [ds[i] for i in range(10)]
    with torch.no_grad():
        plain = mm(data.collate(items, tok.pad_id))
        packed_batch = data.collate(items, tok.pad_id, pack=True, max_len=128)
        packed = mm(packed_batch)
        flex = MultimodalLM(mm.llm, mm.aligner, mm.projectors, mm.media_token_ids, training_mask=document_block_mask)
        blocks = flex.train()(packed_batch)
    torch.testing.assert_close(blocks.sample_loss, plain.sample_loss, atol=1e-5, rtol=1e-5)
    assert packed_batch.input_ids.shape[0] < 10  # several samples share a row
    for m in MODALITIES:  # the collator's flat positions are the placeholders and the labels, packed too
        assert torch.equal(packed_batch.media[m].slots, (packed_batch.input_ids == mm.media_token_ids[m]).flatten()
                           .nonzero()[:, 0])
    assert torch.equal(packed_batch.label_index, (packed_batch.labels != -100).flatten().nonzero()[:, 0])
    torch.testing.assert_close(packed.sample_loss, plain.sample_loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.sample_tokens, plain.sample_tokens)


def test_feature_cache_gives_the_same_loss_as_raw_media(demo_dir, tmp_path):
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    cfg.data.feature_cache, cfg.data.num_workers = str(tmp_path / "cache"), 2  # media decoded by 2 workers
    train.build_cache(cfg)
    cached = data.ConversationDataset(cfg.data.train_file, tok, mm.aligner.config, {"image": 16, "audio": 8}, 128,
                                      feature_cache=train.cache_folder(cfg, cfg.data.train_file))
    mm.eval()
    idx = list(range(12))
    with torch.no_grad():
        a = mm(data.collate([ds[i] for i in idx], tok.pad_id))
        b_batch = data.collate([cached[i] for i in idx], tok.pad_id)
        b = mm(b_batch)
    assert b_batch.media["image"].raw is None and b_batch.media["image"].tokens is not None
    torch.testing.assert_close(b.sample_loss, a.sample_loss, atol=1e-5, rtol=1e-5)


def test_training_step_changes_projectors_and_lora_only(demo_dir, tmp_path):
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    before = {k: v.clone() for k, v in mm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2)
    mm.train()
    batch = data.collate([ds[i] for i in range(8)], tok.pad_id)
    assert batch.modality[:, 0].any() and batch.modality[:, 1].any()
    out = mm(batch)
    (out.loss_sum / out.n_tokens).backward()
    opt.step()
    changed = {k for k, v in mm.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(k.startswith("aligner.") for k in changed)
    assert all(k.startswith("projectors.") or ".lora_" in k for k in changed)
    assert any(k.startswith("projectors.image") for k in changed)
    assert any(k.startswith("projectors.audio") for k in changed)
    assert all(not p.requires_grad for p in mm.aligner.parameters())


def test_demo_is_deterministic(tmp_path):
    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}
    a = digest(demo.make_demo(tmp_path / "a", seed=3, n_train=10, n_val=4, pretrain_steps=2))
    b = digest(demo.make_demo(tmp_path / "b", seed=3, n_train=10, n_val=4, pretrain_steps=2))
    assert a == b and "llm/model.safetensors" in a and "aligner-init/aligner.safetensors" in a
    c = digest(demo.make_demo(tmp_path / "c", seed=4, n_train=10, n_val=4, pretrain_steps=2))
    assert c["data/train.jsonl"] != a["data/train.jsonl"]


def test_chunked_loss_equals_full_logits_cross_entropy():
    """The chunked loss and its gradient equal cross-entropy over full logits (the unoptimised path)."""
    from multimodal import LinearCrossEntropy
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (37,), generator=g)
    scale = torch.rand(37, generator=g)
    ours = LinearCrossEntropy.apply(h, w, t, 8)
    (ours * scale).sum().backward()
    g_ours = h.grad.clone()
    h.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none")
    (ref * scale).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours, h.grad, atol=1e-5, rtol=1e-5)


SPEEDUPS = {"activation_checkpointing": {"activation_checkpointing": True}, "compile": {"compile": "default"},
            "offload_activations": {"activation_checkpointing": True, "offload_activations": True}}


@pytest.mark.parametrize("speedup,quantize", [("activation_checkpointing", "none"), ("compile", "none"),
                                              ("activation_checkpointing", "nf4"), ("offload_activations", "nf4")])
def test_speedups_keep_the_loss_and_gradients(demo_dir, tmp_path, speedup, quantize):
    """Activation checkpointing (its layer inputs on the device, or offloaded to host memory) and compiled layers
    compute what the plain path computes, with the same LoRA dropout masks (lora_B's gradients see them), on a
    bf16/fp32 base and on an NF4 one (QLoRA)."""
    def loss_and_grads(**train_keys):
        cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path, lora={"dropout": 0.1}, train=train_keys,
                                          model={"quantize": quantize})
        mm.train()
        out = mm(data.collate([ds[i] for i in range(6)], tok.pad_id))
        (out.loss_sum / out.n_tokens).backward()
        return out.loss_sum.detach(), {n: p.grad for n, p in mm.named_parameters() if p.grad is not None}
    ref_loss, ref_grads = loss_and_grads()
    loss, grads = loss_and_grads(**SPEEDUPS[speedup])
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-3)


def test_the_aligner_in_fixed_chunks_gives_each_mediums_features(demo_dir, tmp_path):
    """Generation runs the aligner over chunks of one size, the last padded with zeros: each medium's projected
    features are those of one call over all the batch's media."""
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    mm.eval()
    batch = data.collate([ds[i] for i in range(16)], tok.pad_id)
    assert all(len(batch.media[m]) > 5 and len(batch.media[m]) % 5 for m in MODALITIES)
    with torch.no_grad():
        for m in MODALITIES:
            whole, chunked = mm.media_embeds(batch, m), mm.media_embeds(batch, m, chunk=5)
            assert chunked.shape == whole.shape
            torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_rows_are_padded_to_a_multiple(demo_dir, tmp_path):
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path)
    items = [ds[i] for i in range(5)]
    a, b = data.collate(items, tok.pad_id), data.collate(items, tok.pad_id, pad_multiple=64)
    assert b.input_ids.shape[1] % 64 == 0 and b.input_ids.shape[1] >= a.input_ids.shape[1]
    mm.eval()
    with torch.no_grad():
        torch.testing.assert_close(mm(b).sample_loss, mm(a).sample_loss, atol=1e-5, rtol=1e-5)


def test_static_batches_have_few_shapes_and_the_same_loss_and_gradients(demo_dir, tmp_path):
    """`Batch.pad_static` (for the whole-step CUDA graph) pads the labelled positions and the media to few counts;
    the padding adds nothing to the loss, the token counts or the gradients."""
    cfg, tok, mm, ds = model_and_data(demo_dir, tmp_path, lora={"dropout": 0.0})
    groups = [[ds[i] for i in range(s, s + 6)] for s in (0, 6, 12)]
    static = [data.collate(g, tok.pad_id, pad_multiple=256).pad_static(256) for g in groups]  # rows <= 128 tokens
    shapes = [[t.shape for t in b.tensors()] for b in static]
    assert shapes[0] == shapes[1] == shapes[2]
    assert len({sum(len(it.media["audio"]) for it in g if "audio" in it.media) for g in groups}) > 1  # counts differ
    B, T = static[0].input_ids.shape
    assert static[0].label_index.shape[0] % T == 0 and all(len(b.media["audio"]) % B == 0 for b in static)
    mm.train()

    def run(batch):
        mm.zero_grad()
        out = mm(batch)
        (out.loss_sum / out.n_tokens).backward()
        return out, {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}
    for g, s in zip(groups, static):
        ref, ref_grads = run(data.collate(g, tok.pad_id))
        out, grads = run(s)
        assert out.n_tokens == ref.n_tokens == sum(sum(t != -100 for t in it.labels) for it in g)
        torch.testing.assert_close(out.loss_sum, ref.loss_sum, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.sample_loss, ref.sample_loss, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.sample_tokens, ref.sample_tokens)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match="packed rows vary"):
        data.collate(groups[0], tok.pad_id, pack=True, max_len=128).pad_static(8)

    # a full row leaves no scratch position for padded media: the rows are widened, the positions moved with them
    full = data.collate(groups[1], tok.pad_id)
    assert max(full.lengths) == full.input_ids.shape[1] and len(full.media["audio"]) % 6
    widened = full.pad_static(8)
    assert widened.input_ids.shape[1] == full.input_ids.shape[1] + 8
    for m, media in full.media.items():
        assert torch.equal(widened.input_ids.flatten()[widened.media[m].slots[:len(media.slots)]],
                           full.input_ids.flatten()[media.slots])
    ref, _ = run(full)
    out, _ = run(widened)
    torch.testing.assert_close(out.sample_loss, ref.sample_loss, atol=1e-5, rtol=1e-5)


def test_mel_filterbank_equals_transformers():
    """The audio encoder's HTK-mel filters are those of transformers' `mel_filter_bank` (no normalisation)."""
    from transformers.audio_utils import mel_filter_bank

    from encoders import mel_filterbank
    for n_fft, n_mels, rate in ((400, 40, 16000), (400, 80, 16000), (512, 64, 22050)):
        ref = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=rate / 2, sampling_rate=rate, norm=None, mel_scale="htk")
        np.testing.assert_allclose(mel_filterbank(n_fft, n_mels, rate).numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("size", [(50, 70), (20, 31), (32, 32)])
def test_image_preprocessing_equals_pillow(size):
    """Resizing (bilinear, antialiased when shrinking) and normalising match Pillow's resize of the same image,
    within one grey level."""
    from PIL import Image

    from encoders import AlignerConfig
    img = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    cfg = AlignerConfig(image_size=32, image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
    ours = media.preprocess_image(torch.from_numpy(img).permute(2, 0, 1), cfg).permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = (ref - np.array(cfg.image_mean)) / np.array(cfg.image_std)
    assert np.abs(ours - ref).max() < 1.0 / 255.0 / min(cfg.image_std)


def test_long_audio_becomes_windows_of_k_tokens_each(demo_dir, tmp_path):
    """A clip longer than the aligner's window (1 s in the demo) is never cut: it becomes consecutive windows, each
    with its K placeholder tokens, up to data.max_audio_windows; beyond, an error that names its duration."""
    tok = load_tokenizer(demo_dir / "llm", chat_format="chatml")
    from encoders import load_aligner
    acfg = load_aligner(demo_dir / "aligner-init").config
    wave_ = (np.sin(np.arange(40000) * 0.05) * 20000).astype(np.int16)  # 2.5 s at 16 kHz
    (tmp_path / "media").mkdir()
    write_wav(tmp_path / "media" / "long.wav", wave_, 16000, 2)
    sample = {"id": "long", "audio": "media/long.wav", "conversations": [
        {"from": "human", "value": "<audio>\nHow many beeps are there?"}, {"from": "gpt", "value": "one"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n")
    ds = data.ConversationDataset(tmp_path / "d.jsonl", tok, acfg, {"image": 16, "audio": 8}, 128,
                                  max_audio_windows=3)
    assert ds.examples[0].blocks == {"audio": [3]}
    item = ds[0]
    assert item.input_ids.count(tok.media_token_id("audio")) == 3 * 8 and len(item.media["audio"].slots) == 24
    raw = item.media["audio"].raw
    assert raw.shape == (3, 16000)
    np.testing.assert_allclose(raw.flatten()[:40000].numpy(), wave_ / 32768.0, atol=1e-6)
    assert raw.flatten()[40000:].abs().max() == 0  # the last window zero-padded
    with pytest.raises(data.SampleError, match=r"lasts 2.5 s: 3 windows of 1 s, more than data.max_audio_windows = 2"):
        data.ConversationDataset(tmp_path / "d.jsonl", tok, acfg, {"image": 16, "audio": 8}, 128, max_audio_windows=2)

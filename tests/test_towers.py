"""Hugging Face towers (CLIP / SigLIP vision, Whisper's encoder) and their preprocessing, against transformers."""
import json

import numpy as np
import pytest
import torch


import encoders

SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                    patch_size=8)


def vision_folder(tmp_path, kind: str, sharded: bool = False, bf16: bool = False):
    """A random tower saved with save_pretrained; returns (folder, transformers model in fp32)."""
    import transformers
    torch.manual_seed(0)
    if kind == "clip":  # the vision part of a CLIPModel, as LLaVA loads openai/clip-vit-large-patch14
        cfg = transformers.CLIPConfig(vision_config=SMALL_VISION, text_config=dict(hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
        hf = transformers.CLIPModel(cfg).eval()
        oracle = hf.vision_model
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL_VISION)).eval()
        oracle = hf
    with torch.no_grad():  # random norms and biases, so that parity sees them
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    (hf.to(torch.bfloat16) if bf16 else hf).save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    return tmp_path, oracle.float()


@pytest.mark.parametrize("kind,layer,sharded,bf16", [("clip", -1, False, False), ("clip", -2, True, False),
                                                     ("siglip", -1, True, False), ("siglip", -2, False, True)])
def test_vision_towers_equal_transformers(tmp_path, kind, layer, sharded, bf16):
    folder, hf = vision_folder(tmp_path, kind, sharded, bf16)
    assert sharded == (folder / "model.safetensors.index.json").is_file()
    tower = encoders.load_vision_tower(folder, dtype=torch.float32, layer=layer)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        ref = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        torch.testing.assert_close(tower(pixels), ref, atol=1e-4, rtol=1e-4)
    assert tower(pixels).shape[1] == 16 + (kind == "clip")  # CLIP's class token first
    assert not any(p.requires_grad for p in tower.parameters())


def test_whisper_encoder_equals_transformers(tmp_path):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     num_mel_bins=80)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)  # WhisperForConditionalGeneration: keys model.encoder.*, model.decoder.*
    tower = encoders.load_audio_tower(tmp_path, dtype=torch.float32)
    features = torch.randn(1, 80, 3000)
    with torch.no_grad():
        ref = hf.model.encoder(features).last_hidden_state
        torch.testing.assert_close(tower(features), ref, atol=1e-4, rtol=1e-4)
    assert tower(features).shape == (1, 1500, 32) and not any(p.requires_grad for p in tower.parameters())


def test_a_tower_that_does_not_fit_names_the_folder_and_key(tmp_path):
    from safetensors.torch import load_file, save_file
    folder, _ = vision_folder(tmp_path / "t", "siglip")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("layers.1.mlp.fc1.weight"))
    save_file({k: v for k, v in state.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{folder}: the tower's weights .*missing tensors.*layers.1.mlp.fc1.weight"):
        encoders.load_vision_tower(folder)
    state[key] = state[key][:, :5].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="wrong shapes.*layers.1.mlp.fc1.weight"):
        encoders.load_vision_tower(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2"}))
    with pytest.raises(ValueError, match="model_type 'dinov2' is not a supported vision tower"):
        encoders.load_vision_tower(folder)


def photo(rng, h, w):
    """A smooth image with edges, closer to a photo than noise."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    img = np.stack([np.sin(6 * xx + c) * 0.5 + 0.5 for c in range(3)], -1) * 200
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_processors_equal_transformers(tmp_path, kind, fmt):
    import transformers
    from PIL import Image


    import media
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}) \
        if kind == "clip" else transformers.SiglipImageProcessor(size={"height": 24, "width": 24})
    proc.save_pretrained(tmp_path)
    ours = encoders.image_processor(tmp_path)
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (61, 29), (24, 24)):
        Image.fromarray(photo(rng, h, w)).save(tmp_path / f"a.{fmt}")
        image = media.load_image(tmp_path / f"a.{fmt}")
        ref = proc(images=Image.open(tmp_path / f"a.{fmt}"), return_tensors="pt").pixel_values[0]
        got = ours(image)
        assert got.shape == ref.shape == (3, 24, 24)
        assert (got - ref).abs().max() < 0.02, (h, w, (got - ref).abs().max())


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_equals_the_feature_extractor(n_mels):
    import transformers
    rng = np.random.default_rng(n_mels)
    wave = (np.sin(np.arange(16000 * 7) * 0.05) * 0.3 + rng.normal(0, 0.05, 16000 * 7)).astype(np.float32)
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels)(wave, sampling_rate=16000,
                                                                   return_tensors="pt").input_features[0]
    got = encoders.whisper_log_mel(torch.from_numpy(wave), n_mels)
    assert got.shape == ref.shape == (n_mels, 3000)
    assert (got - ref).abs().max() < 1e-3


def test_a_phase_2_run_on_an_aligner_of_hugging_face_towers(demo_dir, tmp_path):
    """aligner.json names a CLIP folder (layer -2) and a Whisper folder; aligner.safetensors holds only the heads.
    load_aligner reads both kinds, the towers stay frozen, and train.py trains projectors and LoRA on the demo's
    images and clips through them."""
    import transformers
    from conftest import demo_config

    import train
    clip, _ = vision_folder(tmp_path / "clip", "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(clip)
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80)).save_pretrained(tmp_path / "whisper")
    cfg = encoders.AlignerConfig(dim=16, image=encoders.EncoderConfig(hf=str(clip), layer=-2),
                              audio=encoders.EncoderConfig(hf=str(tmp_path / "whisper")))
    assert (cfg.sample_rate, cfg.clip_seconds) == (16000, 30.0)  # Whisper's window
    encoders.save_aligner(encoders.Aligner(cfg), tmp_path / "aligner")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "aligner" / "aligner.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["audio.head.bias", "audio.head.weight", "image.head.bias", "image.head.weight"]
    aligner = encoders.load_aligner(tmp_path / "aligner")
    tokens, pooled = aligner.image(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 16) and pooled.shape == (2, 16)  # 16 patches, CLIP's class token dropped
    assert not any(p.requires_grad for p in aligner.parameters())
    run = demo_config(demo_dir, tmp_path / "run", model={"aligner": str(tmp_path / "aligner")},
                      train={"max_steps": 2, "batch_size": 2})
    run.data.val_file = ""
    assert train.fit(run)["step"] == 2


@pytest.mark.parametrize("family,config", [("clip", "CLIPVisionConfig"), ("siglip", "SiglipVisionConfig"),
                                           ("whisper", "WhisperConfig")])
def test_keys_a_config_leaves_out_take_transformers_defaults(family, config):
    """Folders such as google/siglip2-base-patch16-512 list only a few keys of their vision config."""
    import transformers
    ref = getattr(transformers, config)().to_dict()
    for key, value in encoders.TOWER_DEFAULTS[family].items():
        assert ref[key] == value, key

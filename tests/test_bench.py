"""bench.py off the GPU: its synthetic batches fit the training and DPO steps, its FLOP count, its tables and
memory-trace report, the towers it writes, and the parameter report of the shipped 0.5B config."""
import math

import pytest
import torch
from conftest import QWEN25_05B_CONFIG, ROOT, small_bench

import bench
import build
import encoders
import metrics
import train
from config import load_config
from distributed import World

LN2 = math.log(2)  # the DPO loss of a policy equal to its reference


def test_seed_setup_parameter_report():
    """configs/qwen2.5-0.5b.toml on Qwen2.5-0.5B's shape with a seed-sized aligner, on the meta device."""
    import model
    import multimodal
    cfg = load_config(str(ROOT / "configs" / "qwen2.5-0.5b.toml"), [])
    with torch.device("meta"):
        llm = model.LLM(model.LLMConfig.from_hf(QWEN25_05B_CONFIG))
        aligner = encoders.Aligner(bench.SEED_ALIGNER).requires_grad_(False)
        mm = build.assemble(cfg, llm, aligner, {"image": 151655, "audio": 151656})
    groups = build.parameter_groups(mm)
    count = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    assert count["lora"] == 2_162_688 and count["llm"] == 494_032_768
    assert count["projectors"] == 7_870_208  # the seed had 8,397,824: Linear-GELU-Linear, D=1024 -> 2048 -> 896
    total = sum(count.values())
    assert abs(total - 588_503_584) / 588_503_584 < 0.02  # the seed's total, within 2%
    report = multimodal.parameter_report(groups)
    assert "2,162,688" in report and f"{total:,}" in report


@pytest.mark.parametrize("variant", ["text", "multimodal", "cache", "pack"])
def test_bench_batches_run_through_the_training_step(variant):
    """bench.py's synthetic batches (GPU-only timing) fit the model, on a small shape on the CPU."""
    import multimodal
    args, cfg, mm = small_bench("cpu", pack=variant == "pack", multimodal=variant in ("multimodal", "cache"),
                                cache=variant == "cache")
    mm.llm.float()
    batch = bench.make_batch(args, mm, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (2, 128)  # one static shape, packed or not, for the compiled layers
    for m in multimodal.MODALITIES:  # the slots bench.py gives its items are the placeholders
        placeholders = (batch.input_ids == mm.media_token_ids[m]).flatten().nonzero()[:, 0]
        assert torch.equal(batch.media[m].slots if m in batch.media else placeholders[:0], placeholders)
        assert len(placeholders) == (2 * 2 * 32 if m == "image" else 2 * 32) * args.multimodal
    opt, params = train.make_optimizer(mm, cfg.train)
    scaler, autocast = train.mixed_precision(cfg.train, torch.device("cpu"))
    out = train.make_step(mm, opt, scaler, params, autocast, World(), cfg)([batch])
    assert out.finite and out.n_tokens > 0 and 0.3 < float((batch.labels != -100).sum()) / sum(batch.lengths) < 0.6


def test_flops_per_token_counts_the_matmuls():
    """bench.py's MFU numerator on a small shape, counted here layer by layer: forward and input-gradient matmuls
    (4 FLOPs per weight) of the frozen body, the lm_head at labelled positions only, weight gradients too (6) for
    the trainable tensors, and attention's QK^T and AV."""
    args, cfg, mm = small_bench("cpu")
    H, inner, L, nh, nkv, hd, V = 64, 128, 2, 4, 2, 16, 512
    layer = H * nh * hd + nh * hd + 2 * (H * nkv * hd + nkv * hd) + nh * hd * H + 3 * H * inner + 2 * H
    r = 16  # LoRA on q, k, v, o
    lora = r * ((H + nh * hd) + 2 * (H + nkv * hd) + (nh * hd + H))
    D = 32
    projectors = 2 * (D * H + H + H * H + H)
    expected = 4 * L * layer + 4 * V * H * 0.5 + 6 * (L * lora + projectors) + 6 * L * 128 * nh * hd
    assert metrics.flops_per_token(mm, 128, 0.5) == expected


def test_bench_table_gives_the_ratios_to_the_peer():
    ours = {"impl": "mmlora", "batch": 8, "seq": 2048, "grad_ckpt": False, "ms_per_step": 83.2, "tokens_per_s": 196900,
            "mfu": 0.499, "peak_mem_gib": 16.0}
    peer = {"impl": "transformers+peft", "grad_ckpt": False, "compile": True, "ms_per_step": 136.1,
            "tokens_per_s": 120400, "peak_mem_gib": 30.4}
    failed = {"impl": "transformers+peft", "grad_ckpt": True, "compile": False, "error": "OutOfMemoryError()"}
    lines = bench.ratio_table([(ours, peer), ({**ours, "grad_ckpt": True}, failed)]).splitlines()
    assert lines[2] == ("| 8 x 2048 | 83.2 ms, 196.9k tok/s, MFU 49.9%, 16.00 GiB | peer compiled: 136.1 ms, 120.4k "
                        "tok/s, 30.40 GiB | 1.64x | 0.53x |")
    assert lines[3].startswith("| 8 x 2048, activation checkpointing |") and "peer eager: error: OutOfMemoryError()" \
        in lines[3] and lines[3].endswith("| - | - |")


def test_memory_trace_finds_the_peak_and_who_allocated_it():
    """bench.py --memory_trace: the snapshot's trace replayed to its highest point, the blocks live there grouped by
    the innermost frame in our files (torch's own frames skipped), frees counted only once completed."""

    def alloc(addr, size, *frames):
        return {"action": "alloc", "addr": addr, "size": size,
                "frames": [{"filename": f, "line": n, "name": "fn"} for f, n in frames]}
    torch_frame = ("/venv/lib/python3.11/site-packages/torch/nn/functional.py", 7)
    trace = [alloc(1, 100, torch_frame, ("/repo/model.py", 10)),
             alloc(2, 50, ("/repo/lora.py", 5)),
             {"action": "free_requested", "addr": 1, "size": 100},  # not yet reusable: still counted
             alloc(3, 30, ("/repo/model.py", 10)),
             {"action": "free_completed", "addr": 1, "size": 100},
             alloc(4, 40, ("/repo/model.py", 10)),
             {"action": "free_completed", "addr": 2, "size": 50}]
    peak, groups = bench.peak_at({"device_traces": [[], trace]}, device=1)
    assert peak == 180 and groups == {"model.py:10 fn": [100, 30], "lora.py:5 fn": [50]}
    report = bench.peak_report({"device_traces": [trace]}, 0, held=2**30)
    assert "1.00 GiB held" in report and report.splitlines()[1].split()[-2:] == ["model.py:10", "fn"]


def test_bench_dpo_batches_run_through_the_dpo_step():
    """bench.py --grid dpo's batches (GPU-only timing): pairs of rows with each medium once, through the DPO step."""
    args, cfg, mm = small_bench("cpu", multimodal=True, dpo=True)
    mm.llm.float()
    batch = bench.make_batch(args, mm, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert batch.rows.input_ids.shape == (4, 128) and len(batch.rows.media["image"]) == 2 * 2
    assert torch.equal(batch.rows.input_ids[:2, :64], batch.rows.input_ids[2:, :64])  # one prompt, two answers
    opt, params = train.make_optimizer(mm, cfg.train)
    scaler, autocast = train.mixed_precision(cfg.train, torch.device("cpu"))
    out = train.make_step(mm, opt, scaler, params, autocast, World(), cfg)([batch])
    assert out.finite and int(out.n_tokens) == 2 and out.stats[0] / 2 == pytest.approx(LN2, abs=1e-4)


def test_random_towers_for_gpu_runs_load_as_hugging_face_folders(tmp_path):
    """bench.py --make_assets --towers writes SigLIP- and Whisper-shaped folders (here small shapes) that the
    loaders, the processor and the aligner take; the config that uses them parses."""
    vision = dict(bench.SIGLIP_SO400M, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=14)
    audio = dict(bench.WHISPER_SMALL, d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64)
    siglip, whisper = bench.write_random_towers(str(tmp_path), vision, audio)
    assert encoders.load_vision_tower(siglip)(torch.randn(1, 3, 28, 28)).shape == (1, 4, 32)
    assert encoders.load_audio_tower(whisper)(torch.randn(1, 80, 3000)).shape == (1, 1500, 32)
    assert encoders.image_processor(siglip)(torch.zeros(3, 50, 70, dtype=torch.uint8)).shape == (3, 28, 28)
    aligner = encoders.Aligner(encoders.AlignerConfig(dim=8, image=encoders.EncoderConfig(hf=siglip),
                                                audio=encoders.EncoderConfig(hf=whisper)))
    assert aligner.audio(torch.zeros(1, 480000))[0].shape == (1, 1500, 8)
    cfg = load_config(str(ROOT / "configs" / "qwen2.5-0.5b-siglip-whisper.toml"), [])
    assert cfg.data.max_audio_windows == 4 and cfg.model.image_tokens == 81

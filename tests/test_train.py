"""train.py: config errors, exact resume, DDP equivalence, signals, non-finite steps, checkpoints."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_args, demo_config, final_weights, rows, small_bench, torchrun

import build

import train
from checkpoint import export, trainable_state
from config import TrainConfig, load_config
from distributed import World


def test_unknown_key_lists_the_known_ones(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nbatch_sise = 4\n")
    known = r"unknown key train.batch_sise; known keys of \[train\]: phase, batch_size, grad_accum"
    with pytest.raises(ValueError, match=known):
        load_config(str(tmp_path / "c.toml"), [])
    with pytest.raises(ValueError, match="unknown section"):
        load_config(None, ["--optim.lr=1"])


@pytest.mark.parametrize("override,message", [
    ("--train.max_steps=ten", "train.max_steps must be int"),
    ("--lora.rank=0", "lora.rank = 0; it must be at least 1"),
    ("--train.lr_lora=-1e-4", "train.lr_lora = -0.0001; it must be >= 0"),
    ("--train.amp=fp8", "train.amp = 'fp8'; allowed: auto, bf16, fp16, fp32"),
    ("--data.max_len=8", "data.max_len = 8 cannot hold one media block"),
    ("--data.pack=maybe", "data.pack must be bool"),
    ("--train.cuda_graph=true --train.compile=reduce-overhead", "layers cannot record graphs of their own"),
    ("--train.cuda_graph=true --train.compile=max-autotune", "use \"default\" or \"max-autotune-no-cudagraphs\""),
    ("--train.cuda_graph=true --train.amp=fp16", "cannot record fp16's loss scaling"),
    ("--train.cuda_graph=true --data.pack=true", "set data.pack = false with it"),
    ("--train.activation_memory_budget=1.5", "train.activation_memory_budget = 1.5; it must be in"),
    ("--train.strategy=fsdp --train.compile=reduce-overhead", "use \"default\" or \"max-autotune-no-cudagraphs\" with"),
    ("--train.phase=align --train.cuda_graph=true", "set it to false with train.phase"),
    ("--train.offload_activations=true", "set train.activation_checkpointing = true with it"),
    ("--train.offload_activations=true --train.activation_checkpointing=true --train.compile=default",
     "set train.compile = \"none\" and train.cuda_graph = false with it"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, override.split())


def test_cuda_graph_is_refused_where_it_cannot_record():
    cfg = load_config(None, ["--train.cuda_graph=true", "--train.compile=max-autotune-no-cudagraphs"])
    with pytest.raises(ValueError, match="records the step on a GPU; on CPU set it to false"):
        train.make_step(None, None, None, [], None, World(), cfg)


def test_toml_types_are_checked(tmp_path):
    (tmp_path / "c.toml").write_text('[train]\nmax_steps = "100"\n')
    with pytest.raises(ValueError, match="train.max_steps must be int, got str"):
        load_config(str(tmp_path / "c.toml"), [])


def test_lr_is_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [train.lr_factor(s, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(0.1)


def test_resume_is_bit_exact(demo_dir, tmp_path):
    const = {"min_lr_ratio": 1.0, "warmup_steps": 0, "grad_accum": 2, "save_every": 3}
    straight = demo_config(demo_dir, tmp_path / "a", train={**const, "max_steps": 6})
    train.fit(straight)
    half = demo_config(demo_dir, tmp_path / "b", train={**const, "max_steps": 3})
    train.fit(half)
    again = demo_config(demo_dir, tmp_path / "b", train={**const, "max_steps": 6})
    train.fit(again)
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_finished_run_continues_with_more_steps(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 2})
    train.fit(cfg)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    cfg.train.max_steps = 3
    result = train.fit(cfg)
    assert result["step"] == 3 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3]

    # the export: a peft-format adapter and the projectors, equal to the final checkpoint's tensors
    import lora
    from safetensors.torch import load_file
    final = final_weights(tmp_path)
    _, mm = build.build_model(cfg, torch.device("cpu"))
    lora.load_adapter(mm.llm, tmp_path / "export" / "adapter")
    for k, v in lora.lora_state_dict(mm.llm).items():
        assert torch.equal(v, final["llm." + k])
    projectors = load_file(str(tmp_path / "export" / "projectors.safetensors"))
    assert projectors.keys() and all(torch.equal(v, final["projectors." + k]) for k, v in projectors.items())


def test_compiled_layers_train_evaluate_and_generate(demo_dir, tmp_path):
    """With train.compile the training steps run compiled layers and evaluation runs them eager: a run goes
    through its evaluation and generation, with the losses of the uncompiled run."""
    runs = {}
    for mode in ("none", "default"):
        cfg = demo_config(demo_dir, tmp_path / mode, lora={"dropout": 0.0},
                          train={"max_steps": 2, "eval_every": 2, "eval_samples": 16, "compile": mode})
        train.fit(cfg)
        runs[mode] = rows(tmp_path / mode), rows(tmp_path / mode, "val")
    (train_plain, val_plain), (train_compiled, val_compiled) = runs["none"], runs["default"]
    assert len(val_compiled) == 1 and val_compiled[0]["accuracy"] is not None
    for a, b in zip(train_plain + val_plain, train_compiled + val_compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def average_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: steps of train_step through DDP, then the same through `average_gradients`."""
    import bench
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank=rank, local_rank=rank, size=2)
    moved = {}
    for how in ("ddp", "average"):
        args, cfg, mm = small_bench("cpu", multimodal=True, cache=True)
        mm.llm.float()
        for m in mm.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt, params = train.make_optimizer(mm, cfg.train)
        scaler, autocast = train.mixed_precision(cfg.train, world.device)
        if how == "ddp":
            step = train.make_step(mm, opt, scaler, params, autocast, world, cfg)
        else:  # GraphedStep's step, unrecorded: the gradients averaged by its own all-reduce
            step = functools.partial(train.train_step, mm, opt=opt, scaler=scaler, params=params, world=world,
                                     autocast=functools.partial(autocast, cache_enabled=False),
                                     grad_clip=cfg.train.grad_clip, average=True)
        g = torch.Generator().manual_seed(rank)  # each rank its own batches
        micro = [bench.make_batch(args, mm, world.device, g) for _ in range(2)]
        before = {k: v.detach().clone() for k, v in trainable_state(mm).items()}
        norms = []
        for _ in range(2):  # two steps: LoRA's A gets a gradient once B is no longer zero
            norms.append(step(micro).grad_norm)
            opt.zero_grad(set_to_none=True)
        moved[how] = {k: v.detach() - before[k] for k, v in trainable_state(mm).items()}
        moved[how]["grad norms"] = torch.stack(norms)  # AdamW's update hides a scale; the norms show it
    torch.save(moved, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_recorded_steps_average_the_gradients_as_ddp(tmp_path):
    """Under torchrun with train.cuda_graph the step all-reduces the gradients itself (so that the graph holds
    it): two gloo ranks with different batches and two micro-batches update the weights as DDP does."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(average_worker, args=(port, str(tmp_path / "moved")), nprocs=2)
    ranks = [torch.load(tmp_path / f"moved.{r}") for r in range(2)]
    for moved in ranks:
        for k, ddp in moved["ddp"].items():
            assert ddp.abs().max() > 0  # every trainable tensor moved
            torch.testing.assert_close(moved["average"][k], ddp, atol=1e-6, rtol=1e-4, msg=k)
            torch.testing.assert_close(moved["average"][k], ranks[0]["average"][k], atol=0, rtol=0)


def run_until_signal(cfg, sig, nproc=1):
    """Start a run in a subprocess, send `sig` once it has logged step 2, wait for it to stop."""
    args = cli_args(cfg)
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = Path(cfg.run.out_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    if nproc == 1:
        p.send_signal(sig)
    else:  # a scheduler signals the workers; torchrun's own children
        import psutil
        for c in psutil.Process(p.pid).children(recursive=True):
            c.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


SIGNAL_RUN = dict(lora={"dropout": 0.0}, train={"max_steps": 20, "grad_accum": 2, "batch_size": 2})


@pytest.fixture(scope="module")
def straight_run(demo_dir, tmp_path_factory):
    """The uninterrupted run that a signalled run must match (one process at batch 4: the global batch of 2 ranks at
    2): its out_dir."""
    out = tmp_path_factory.mktemp("straight")
    cfg = demo_config(demo_dir, out, **SIGNAL_RUN)
    cfg.train.batch_size = 4
    train.fit(cfg)
    return out


# SIGTERM, SIGUSR1 and SIGINT share one handler (SIGINT, and a second Ctrl-C: test_faults.py)
@pytest.mark.parametrize("sig,nproc", [(signal.SIGUSR1, 1), (signal.SIGTERM, 2)])
def test_signal_saves_an_emergency_checkpoint_and_resume_matches(demo_dir, tmp_path, straight_run, sig, nproc):
    """The signalled run, resumed, has the losses, token counts and final weights of one process straight through;
    on 2 ranks (batch 2 each) too, so that 2 ranks train as 1 with the same global batch."""
    cut = demo_config(demo_dir, tmp_path / "b", **SIGNAL_RUN)
    if nproc == 1:
        cut.train.batch_size = 4
    code, out = run_until_signal(cut, sig, nproc)
    assert code != 0, out
    state = json.loads((tmp_path / "b" / "checkpoints" / "emergency" / "state.json").read_text())
    assert 2 <= state["step"] < 20, out
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "emergency"
    if nproc == 1:
        train.fit(cut)
    else:
        r = torchrun(cli_args(cut), nproc)
        assert r.returncode == 0, r.stderr[-8000:]  # the ranks' own errors come before torchrun's summary
    a, b = rows(straight_run), rows(tmp_path / "b")
    assert [x["step"] for x in b] == [x["step"] for x in a] == list(range(1, 21))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and x["tokens"] == y["tokens"]
        # the tokens a step processed, summed over the ranks: tokens/s times seconds a step
        assert y["tokens_per_s"] * y["step_time"] == pytest.approx(x["tokens_per_s"] * x["step_time"], rel=1e-6)
    wa, wb = final_weights(straight_run), final_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def test_non_finite_steps_are_skipped_then_stop_the_run(demo_dir, tmp_path, monkeypatch):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 10, "max_bad_steps": 3})
    import multimodal
    real = multimodal.MultimodalLM.forward
    calls = {"n": 0}

    def poisoned(self, batch):  # the loss turns NaN from the third micro-step on
        out = real(self, batch)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out
    monkeypatch.setattr(multimodal.MultimodalLM, "forward", poisoned)
    saves = []
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda name, **kw: saves.append(name) or real_save(name, **kw))
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        train.fit(cfg)
    state = json.loads((tmp_path / "checkpoints" / "emergency" / "state.json").read_text())
    assert state["step"] == 2 and state["bad_steps"] == 3
    assert saves.count("emergency") == 1  # by every rank, not again by rank 0 alone as after a crash


def test_metrics_rows_time_the_steps_they_cover(demo_dir, tmp_path, monkeypatch):
    """A row's step time and data wait are over the steps since the last row (the last row covers fewer than
    run.log_every), and an evaluation between two rows is not counted as the steps' time: each step here takes at
    least 0.3 s, so no row may say less."""
    real = train.make_step

    def slow_step(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda micro: time.sleep(0.3) or step(micro)
    monkeypatch.setattr(train, "make_step", slow_step)
    cfg = demo_config(demo_dir, tmp_path, run={"log_every": 3}, train={"max_steps": 5, "eval_every": 2})
    train.fit(cfg)
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [3, 5]
    for r in logged:
        assert r["step_time"] >= 0.3, r
        assert r["tokens_per_s"] * r["step_time"] <= 4 * 128, r  # at most a batch's tokens a step


def test_incompatible_checkpoint_is_refused_before_training(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path, train={"max_steps": 2})
    train.fit(cfg)
    before = (tmp_path / "checkpoints" / "step_0000002" / "trainable.safetensors").read_bytes()
    cfg.lora.rank = 8
    with pytest.raises(ValueError, match="does not fit this run"):
        train.fit(cfg)
    cfg.lora.rank = 4
    for folder in ("step_0000002", "best"):  # no readable checkpoint left to fall back on
        (tmp_path / "checkpoints" / folder / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot be read"):
        train.fit(cfg)
    assert (tmp_path / "checkpoints" / "step_0000002" / "trainable.safetensors").read_bytes() == before


def test_the_frozen_aligner_stored_for_autocast_gives_the_same_features_and_exports_its_own(demo_dir, tmp_path):
    """With its matmul weights stored in bf16, the aligner's features under bf16 autocast are bit-identical, and the
    export still holds the aligner's fp32 weights, read from its folder."""
    import encoders
    cfg = demo_config(demo_dir, tmp_path / "run", train={"amp": "bf16"})
    _, mm = build.build_model(cfg, torch.device("cpu"))
    _, autocast = train.mixed_precision(cfg.train, torch.device("cpu"))
    c, g = mm.aligner.config, torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, c.image_size, c.image_size, generator=g)
    wave = torch.randn(2, int(c.sample_rate * c.clip_seconds), generator=g) * 0.1

    def features():
        with torch.no_grad(), autocast():
            return [*mm.aligner.image(pixels), *mm.aligner.audio(wave)]
    before = features()
    train.store_for_autocast(mm.aligner, autocast)
    dtypes = {n: p.dtype for n, p in mm.aligner.named_parameters()}
    assert dtypes["image.head.weight"] == dtypes["audio.encoder.conv1.weight"] == torch.bfloat16
    assert dtypes["image.encoder.pos_embed"] == dtypes["image.encoder.norm.weight"] == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, features()))
    export(mm, tmp_path / "export", cfg)
    source = encoders.load_aligner(cfg.model.aligner).state_dict()
    exported = encoders.load_aligner(tmp_path / "export" / "aligner").state_dict()
    assert source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)


def test_demo_assets_with_another_llm_shape_train(tmp_path):
    """make_demo with a given LLM shape (bench.py --make_assets uses Qwen2.5-0.5B's) gives a trainable setup."""
    import demo
    import model
    shape = model.LLMConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    folder = demo.make_demo(tmp_path / "assets", n_train=16, n_val=4, pretrain_steps=0, llm_config=shape)
    llm = model.load_llm(folder / "llm")
    assert llm.config.vocab_size == 1000 and llm.lm_head.weight.dtype == torch.bfloat16
    cfg = demo_config(folder, tmp_path / "run", train={"max_steps": 2}, model={"dtype": "float32"})
    assert train.fit(cfg)["step"] == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path), [])
    assert cfg.run.out_dir


def test_lora_targets_may_be_written_with_spaces(demo_dir, tmp_path):
    """lora.targets = "q_proj, v_proj" (as a person writes a list) puts adapters on q_proj and v_proj."""
    import lora
    cfg = demo_config(demo_dir, tmp_path, lora={"targets": "q_proj, v_proj"})
    _, mm = build.build_model(cfg, torch.device("cpu"))
    names = {name.rsplit(".", 1)[-1] for name in lora.outer_lora_modules(mm.llm)}
    assert names == {"q_proj", "v_proj"}


def test_a_sliding_window_model_packs_rows_with_the_boolean_mask():
    """Layers compiled on a GPU take packed rows' mask as flex attention's BlockMask; a sliding window is a band on a
    boolean mask, so a sliding-window model gets the boolean document mask there."""
    from model import LLMConfig
    from multimodal import document_block_mask, document_mask
    cfg = TrainConfig(compile="default")
    assert build.loss_and_mask(cfg, True, LLMConfig(sliding_window=4))["training_mask"] is document_mask
    assert build.loss_and_mask(cfg, True, LLMConfig())["training_mask"] is document_block_mask

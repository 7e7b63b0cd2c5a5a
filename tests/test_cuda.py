"""GPU-only paths, checked against their plain counterparts; skipped where there is no GPU (as in CI)."""
import functools

import pytest
import torch
from conftest import cli_args, demo_config, rows, small_bench, torchrun

import bench
import train
from checkpoint import trainable_state
from distributed import World

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def steps_without_dropout(**flags):
    """bench.py's small model on the GPU (`flags` as in small_bench) with dropout off, so that two setups draw
    nothing random: the model, its optimizer, train.py's step and 3 batches."""
    world = World(device=torch.device("cuda"))
    args, cfg, mm = small_bench("cuda", **flags)
    for m in mm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt, params = train.make_optimizer(mm, cfg.train)
    scaler, autocast = train.mixed_precision(cfg.train, world.device)
    run_step = train.make_step(mm, opt, scaler, params, autocast, world, cfg)
    g = torch.Generator().manual_seed(0)
    return mm, opt, run_step, [bench.make_batch(args, mm, world.device, g) for _ in range(3)]


@pytest.mark.parametrize("compile_,qlora,dpo", [(False, False, False), (True, False, False), (False, True, False),
                                               (True, True, False), (False, False, True), (True, False, True)])
def test_cuda_graph_steps_equal_plain_steps(compile_, qlora, dpo):
    """train.cuda_graph: the warm-up step, the recorded one and the replays give the losses, gradient norms and
    weights of plain steps (no dropout, so that both draw nothing random), with media spliced from the cache; on
    a bf16 base and on an NF4 one (its Triton dequantization recorded, or torch's ops compiled); and DPO's step
    (the reference pass with the adapters off, then the policy's, in one graph)."""
    results = []
    for graph in (False, True):
        mm, opt, run_step, batches = steps_without_dropout(multimodal=True, cache=True, cuda_graph=graph,
                                                           compile=compile_, qlora=qlora, dpo=dpo)
        before = {k: v.detach().clone() for k, v in trainable_state(mm).items()}
        mm.train()
        losses = []
        for i in range(7):  # a warm-up step, a recorded one, then replays over new batches of the same shapes
            train.set_lr(opt, 1.0 if i % 2 else 0.5)  # the schedule must reach the replays
            out = run_step([batches[i % 3]])
            losses.append(((out.stats[0] / out.n_tokens).item(), out.grad_norm.item(), bool(out.finite)))
            opt.zero_grad(set_to_none=True)
        moved = {k: v.detach() - before[k] for k, v in trainable_state(mm).items()}
        results.append((losses, moved))
        torch.compiler.reset()
    (plain, moved_plain), (graphed, moved_graphed) = results
    for a, b in zip(plain, graphed):
        assert b[2] and b[0] == pytest.approx(a[0], rel=2e-3) and b[1] == pytest.approx(a[1], rel=2e-3)
    for k in moved_plain:
        assert moved_plain[k].abs().max() > 1e-4  # every trainable tensor was updated
        torch.testing.assert_close(moved_graphed[k], moved_plain[k], atol=5e-5, rtol=5e-2)


def test_train_py_with_cuda_graph_equals_plain(demo_dir, tmp_path, monkeypatch):
    """train.py with train.cuda_graph on conversation data: static collation keeps the shapes few, the steps
    replay graphs, and the losses are those of plain steps (no dropout)."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    losses = {}
    for graph in (False, True):
        cfg = demo_config(demo_dir, tmp_path / str(graph), lora={"dropout": 0.0}, data={"pad_multiple": 64},
                          train={"max_steps": 16, "cuda_graph": graph, "amp": "fp32"}, run={"device": "cuda"})
        train.fit(cfg)
        losses[graph] = [r["loss"] for r in rows(tmp_path / str(graph))]
    assert len(replays) >= 8  # most steps replayed a recorded graph
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_cuda_graph_equal_ddp(demo_dir, tmp_path):
    """train.cuda_graph under torchrun (the gradients' all-reduce recorded in each rank's graph) logs the losses
    of the DDP run (no dropout, fp32)."""
    losses = {}
    for graph in (False, True):
        cfg = demo_config(demo_dir, tmp_path / str(graph), lora={"dropout": 0.0}, data={"pad_multiple": 64},
                          train={"max_steps": 16, "batch_size": 2, "cuda_graph": graph, "amp": "fp32"},
                          run={"device": "cuda"})
        r = torchrun(cli_args(cfg), 2)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[graph] = [x["loss"] for x in rows(tmp_path / str(graph))]
    assert len(losses[True]) == 16 and losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_on_two_gpus_equals_ddp_in_bf16(demo_dir, tmp_path):
    """train.strategy = "fsdp" on 2 GPUs (NCCL, a bf16 base with fp32 LoRA: the mixed-precision policy) logs the
    losses of ddp on 2 GPUs, within bf16's tolerance, and evaluates alike."""
    out = {}
    for strategy in ("ddp", "fsdp"):
        cfg = demo_config(demo_dir, tmp_path / strategy, lora={"dropout": 0.0},
                          train={"max_steps": 8, "batch_size": 2, "strategy": strategy, "eval_every": 8},
                          model={"dtype": "bfloat16"}, run={"device": "cuda"})
        r = torchrun(cli_args(cfg), 2)
        assert r.returncode == 0, r.stderr[-3000:]
        out[strategy] = [x["loss"] for x in rows(tmp_path / strategy)], rows(tmp_path / strategy, "val")[-1]
    assert len(out["fsdp"][0]) == 8 and out["fsdp"][0] == pytest.approx(out["ddp"][0], rel=2e-2)
    assert out["fsdp"][1]["loss"] == pytest.approx(out["ddp"][1]["loss"], rel=2e-2)


@pytest.mark.parametrize("compile_", [True, False])
def test_recorded_decoder_gives_the_plain_tokens(compile_):
    """generate.py's recorded decoder (the eager steps recorded, generate.py's default on a GPU, or compiled first
    with --compile), replayed as one CUDA graph, generates what the plain steps generate (fp32, greedy), at batch 1
    and 3, for several answers in a row; sampling with top_k=1 is greedy."""
    import decode
    import model
    torch.manual_seed(0)
    cfg = model.LLMConfig(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          qkv_bias=True, tie_word_embeddings=True)
    llm = model.LLM(cfg).cuda().eval()
    decoder = decode.GraphDecoder(llm, compile=compile_)
    for n in ((7,), (5, 11, 8)):
        for _ in range(2):  # recorded, then replayed
            prompts = [torch.randint(0, 512, (k,)).tolist() for k in n]
            assert llm.generate(prompts, 12, decoder=decoder) == llm.generate(prompts, 12)
    assert llm.generate(prompts, 12, decoder=decoder, temperature=1.0, top_k=1) == llm.generate(prompts, 12)


def test_one_row_matmul_kernel_equals_linear():
    """The recorded decoder's one-row matmul (Triton, in compiled code) gives what torch's ops give for
    `decode_linear`: F.linear with and without a bias, after an RMSNorm or SwiGLU, plus a residual; in bf16 and fp32,
    on sizes that are not multiples of its blocks."""
    import decode
    import model
    decode.load_kernels()
    step = torch.compile(decode.decode_linear, fullgraph=True, dynamic=False)
    cases = [((1152, 896), torch.bfloat16, dict(bias=True)), ((896, 4864), torch.bfloat16, dict()),
             ((101, 37), torch.float32, dict(bias=True)), ((9728, 896), torch.float32, dict()),
             ((1152, 896), torch.bfloat16, dict(bias=True, norm=True)), ((9728, 896), torch.bfloat16, dict(norm=True)),
             ((896, 896), torch.bfloat16, dict(residual=True)), ((101, 37), torch.float32, dict(norm=True)),
             ((896, 4864), torch.bfloat16, dict(swiglu=True, residual=True)),
             ((101, 37), torch.float32, dict(bias=True, swiglu=True, residual=True))]
    for (N, K), dtype, case in cases:
        torch._dynamo.reset()
        x = torch.randn(1, 1, 2 * K if case.get("swiglu") else K, device="cuda", dtype=dtype)
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
        b = torch.randn(N, device="cuda", dtype=dtype) if case.get("bias") else None
        norm = None
        if case.get("norm"):
            norm = model.RMSNorm(K, 1e-6).to("cuda", dtype)
            torch.nn.init.normal_(norm.weight, 1.0, 0.2)
        r = torch.randn(1, 1, N, device="cuda", dtype=dtype) if case.get("residual") else None
        kwargs = dict(norm=norm, swiglu=case.get("swiglu", False), residual=r)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        with torch.no_grad():  # as in decoding: the kernel has no backward
            torch.testing.assert_close(step(x, w, b, **kwargs), decode.decode_linear(x, w, b, **kwargs), rtol=tol,
                                       atol=tol, msg=lambda m: f"{(N, K)} {dtype} {case}: {m}")


def test_recorded_continuous_batching_gives_the_plain_tokens():
    """--predict's path as recorded on a GPU (`GraphDecoder.stream`, eager steps recorded as one graph): more
    prompts than rows, rows that stop early taking the next prompts, give each prompt the tokens that the plain
    steps give it alone (fp32, greedy)."""
    import functools

    import decode
    import model
    torch.manual_seed(0)
    cfg = model.LLMConfig(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          qkv_bias=True, tie_word_embeddings=True)
    llm = model.LLM(cfg).cuda().eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (40, 33, 29, 20, 17, 12, 9, 5, 3)]
    alone = [llm.generate([p], 12)[0] for p in prompts]
    stops = (alone[0][3], alone[2][6])
    expected = [llm.generate([p], 12, stop_ids=stops)[0] for p in prompts]
    decoder = decode.GraphDecoder(llm, compile=False)
    got = {}
    batches = iter([[(i, prompts[i], None) for i in range(s, min(s + 3, len(prompts)))] for s in (0, 3, 6)])
    with torch.no_grad():
        for finished in decoder.stream(batches, 12, functools.partial(model.sample), stops, rows=2):
            got.update(finished)
    # one cache; a graph for each row count that ran (rows 0..n-1, n = 1 or 2)
    assert [got[i] for i in range(len(prompts))] == expected
    assert len({k[:2] for k in decoder.graphs}) == 1 and {k[2] for k in decoder.graphs} <= {1, 2}
    # a server's decoder records every row count's call before its first request, and its requests record none
    decoder = decode.GraphDecoder(llm, compile=False)
    with torch.no_grad():
        decoder.record_for_serving(4, None, 48, 12, functools.partial(model.sample), None)
        recorded = dict(decoder.graphs)
        assert {k[2] for k in recorded} == {1, 2, 4}
        batches = iter([[(i, prompts[i], None) for i in range(len(prompts))]])
        got = dict(x for finished in decoder.stream(batches, 12, functools.partial(model.sample), stops, rows=4,
                                                     prompt_tokens=48) for x in finished)
    assert [got[i] for i in range(len(prompts))] == expected and decoder.graphs == recorded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_equals_attention(dtype, monkeypatch):
    """The recorded decoder's attention for one new token a row (in compiled code, one Triton kernel for RoPE, the
    cache write and attention over the valid slots; a long cache split over programs, then combined) gives
    `Attention.heads`' output and caches: grouped heads, with and without Qwen3's q/k norms, left-padded rows with
    holes, slots at the start, inside and at the edges of its blocks and parts, parts with nothing valid."""
    import decode
    import model
    decode.load_kernels()
    step = torch.compile(decode.DecodeLayer.heads, fullgraph=True, dynamic=False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # each SLOTS_A_PROGRAM compiles afresh
    B = 3
    for nh, n_kv, hd, qk_norm in ((14, 2, 64, False), (8, 4, 128, True), (4, 2, 16, False)):
        cfg = model.LLMConfig(hidden_size=96, num_attention_heads=nh, num_key_value_heads=n_kv, head_dim=hd,
                              qkv_bias=True, qk_norm=qk_norm)
        llm = model.LLM(cfg).init_weights(0.2).to("cuda", dtype)
        layer = llm.model.layers[0]
        attn = layer.self_attn
        if qk_norm:
            torch.nn.init.normal_(attn.q_norm.weight, 1.0, 0.2)
            torch.nn.init.normal_(attn.k_norm.weight, 1.0, 0.2)
        decoding = decode.DecodeLayer(layer)
        for S, per_program, slots in ((256, 512, (0, 1, 63, 64, 65, 200)), (256, 64, (1, 64, 200, 255)),
                                      (2048, 512, (300, 511, 512, 1500, 2047)),
                                      (2048, 128, (0, 255, 256, 1000, 2047))):
            torch._dynamo.reset()
            monkeypatch.setattr(decode.kernels, "SLOTS_A_PROGRAM", per_program)
            for slot in slots:
                valid = torch.zeros(B, S, dtype=torch.bool, device="cuda")
                for b, first in enumerate((0, min(slot, 100), slot)):  # left padding; the last row's only token is new
                    valid[b, first:slot + 1] = True
                valid[0, 3:9] = False  # a hole
                valid[:, slot] = True
                x = torch.randn(B, 1, 96, device="cuda", dtype=dtype)
                cos, sin = llm.rope(valid.sum(-1, keepdim=True) - 1, dtype)
                caches = [model.KVCache(B, n_kv, S, hd, "cuda", dtype) for _ in range(2)]
                for c in caches:
                    c.k.normal_(), c.v.normal_()
                caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
                at = torch.full((B,), slot, device="cuda")
                tol = 4e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: RoPE rounds once, softmax weights in bf16
                with torch.no_grad():
                    y = step(decoding, x, cos, sin, valid[:, None, None, :], caches[0], at)
                    qkv = (m(layer.input_layernorm(x)) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
                    expected = attn.heads(*qkv, cos, sin, valid[:, None, None, :], caches[1], at)
                where = f"{(nh, n_kv, hd, qk_norm)} S {S} ({per_program} a program) slot {slot}"
                for got, want in ((y, expected), (caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{where}: {m}")


def test_packed_rows_in_compiled_layers_equal_the_dense_mask():
    """Packed rows where the layers are compiled (flex attention on a block mask) give the losses and gradient
    norms of eager layers with the dense document mask (no dropout), step after step."""
    results = []
    for compile_ in (False, True):
        mm, opt, run_step, batches = steps_without_dropout(pack=True, compile=compile_, compile_mode="default")
        assert all(b.doc_ids is not None for b in batches)
        mm.train()
        steps = []
        for b in batches:
            out = run_step([b])
            steps.append(((out.stats[0] / out.n_tokens).item(), out.grad_norm.item()))
            opt.zero_grad(set_to_none=True)
        results.append(steps)
        torch.compiler.reset()
    for a, b in zip(*results):
        assert b[0] == pytest.approx(a[0], rel=2e-3) and b[1] == pytest.approx(a[1], rel=2e-2)


def test_recorded_compiled_dropout_recomputes_each_replay_s_mask():
    """In a recorded step (train.cuda_graph with compiled layers), the backward's recomputed LoRA dropout is the
    forward's at every replay, and each replay draws a new mask (A the identity: the output's zeros are the mask)."""
    import lora
    x, w = torch.randn(64, 128, device="cuda", requires_grad=True), torch.eye(128, device="cuda", requires_grad=True)
    c, drop, down = torch.randn(64, 128, device="cuda"), torch.nn.Dropout(0.5).train(), torch.compile(lora.lora_down)
    down = functools.partial(down, recompute=True)

    def step():
        y = down(x, w, drop)
        return (y, *torch.autograd.grad((y * c).sum(), (x, w)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled and warmed up before recording, as GraphedStep does
        step(), step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    masks = []
    for _ in range(3):
        graph.replay()
        y, gx, gw = (t.clone() for t in out)
        masks.append(y != 0)
        torch.testing.assert_close(gx, torch.where(masks[-1], c * 2, 0.0))
        torch.testing.assert_close(gw, c.T @ y)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_nf4_dequantize_kernel_equals_torchs_ops():
    """NF4Linear's Triton dequantization on the GPU, which decodes double-quantized scales itself, gives exactly
    what torch's ops give (quant.dequantize_absmax, quant.dequantize_nf4), in bf16 and fp32, with and without
    double quantization, blocks of 64 and 16, a size that is no multiple of a program's bytes or of a scale's
    group."""
    import quant
    assert quant.dequantize_kernel() is not None
    for (N, K), block, double in (((4864, 896), 64, True), ((130, 48), 16, False), ((130, 48), 16, True),
                                  ((3, 64), 64, True)):
        w = torch.randn(N, K, device="cuda")
        for dtype in (torch.bfloat16, torch.float32):
            layer = quant.NF4Linear(w, None, block, double, dtype)
            ref = quant.dequantize_nf4(layer.packed, layer.block_absmax(), (N, K), dtype)
            assert torch.equal(layer.dequantized(), ref), ((N, K), block, double, dtype)

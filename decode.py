"""The fast decoder of `generate.py --compile`: opt-in speed machinery for decoding on a GPU, kept apart from the
user's path. LoRA is merged, each layer's q/k/v and gate/up run as one matmul, and the decode step is compiled
and recorded as one CUDA graph for several steps at a time (`GraphDecoder`); the Triton kernels it calls and their
tile rules are here too:

    decoder = GraphDecoder(llm)                        # prepares llm for decoding (in place)
    llm.generate(prompts, 32, decoder=decoder)         # LLM.generate's decode steps, replayed

`one_row_linear`: a matmul of one row with the RMSNorm before it, the SwiGLU before down or the residual add after
it (batch 1); `decode_attention`: RoPE, the cache write and attention of one new token, the cache split over
programs when it is long (flash-decoding). Without Triton (a CPU install) the same decoder runs torch's ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora

def static_decode(llm, tokens: torch.Tensor, valid: torch.Tensor, caches: list, slot: torch.Tensor) -> torch.Tensor:
    """LLM.decode_step with fixed shapes: the new token (B, 1) goes to cache slot `slot` (1,), attends to every
    valid slot of the whole cache (B, S), and its position is the count of its row's valid slots before it."""
    pos = valid.sum(-1, keepdim=True) - 1  # (B, 1)
    h = llm.hidden_states(llm.model.embed_tokens(tokens), pos, valid[:, None, None, :], caches, slot)  # (B, 1, H)
    return llm.lm_head(h[:, -1]).float()  # (B, V)


try:  # Triton comes with torch's CUDA builds; without it (a CPU install) the decoder uses F.linear throughout
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def one_row_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of `one_row_kernel` for a weight (N, K), chosen from the kernel timed in the
    decode step's conditions on an H200 (each layer's weight read from HBM, in a CUDA graph; BENCHMARKS.md). A
    weight of few rows (q/k/v, o_proj, down) takes whole rows of up to 1024 a program, and as many rows as leave
    two programs a core; a weight of many rows (gate/up, the lm_head) takes tiles of 8 rows by 256, or by 512 past
    64k rows. A rule, not autotuning: the autotuner times each kernel alone, its weight warm in the L2 cache, and
    its picks for the same step changed from one compilation to the next, and with them the step's speed."""
    if N >= 8 * 1024:
        return 8, 512 if N >= 64 * 1024 else 256, 4
    block_n = 8
    while block_n > 1 and N // block_n < 264:
        block_n //= 2
    block_k = min(1024, 1 << (K - 1).bit_length())
    return block_n, block_k, 8 if block_n * block_k >= 4096 or K > block_k else 4


SLOTS_A_PROGRAM = 128  # decode_attention splits a longer cache into parts of at least this many slots,
PARTS = 8  # and at most this many parts (more parts: more programs in flight, more partial results to combine)


def attention_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of `decode_attention_kernel`, timed as `one_row_config`: blocks of 128 cache slots
    where a slot's key is at most 128 bytes, else 64 (the blocks in flight fit the shared memory)."""
    if head_dim * dtype.itemsize <= 128:
        return 128, 8
    return 64, 4


if triton is not None:
    @triton.jit
    def one_row_kernel(x_ptr, w_ptr, b_ptr, norm_ptr, r_ptr, y_ptr, N, K, eps, HAS_BIAS: tl.constexpr,
                       NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """y = w @ f(x) (+ b) (+ r) for one row and w (N, K), in fp32: each program makes BLOCK_N outputs. f is
        RMSNorm with weight `norm` (NORM), SwiGLU of x = [gate | up] (2K,) (SWIGLU), else none; each rounds where
        model.RMSNorm and model.MLP round."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        if NORM:  # every program sums x's squares itself: x is small, and the kernel needs no other to finish
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
                squares += xk * xk
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
            if SWIGLU:
                up = tl.load(x_ptr + K + ks, mask=ks < K, other=0.0)
                gate = x.to(tl.float32)
                x = (gate * tl.sigmoid(gate)).to(up.dtype) * up
            if NORM:
                x = (x.to(tl.float32) * rstd).to(x.dtype) * tl.load(norm_ptr + ks, mask=ks < K, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        if RESIDUAL:  # the matmul's output rounds to the output's dtype first, as an add after F.linear does
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(r_ptr + rows, mask=rows < N).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    @torch.library.triton_op("mmlora::one_row_linear", mutates_args=())
    def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       norm_weight: torch.Tensor | None, eps: float, swiglu: bool,
                       residual: torch.Tensor | None) -> torch.Tensor:
        """`decode_linear` of one row x (K,), or (2K,) with `swiglu`, by weight (N, K): (N,)."""
        N, K = weight.shape
        y = x.new_empty(N)
        block_n, block_k, warps = one_row_config(N, K)
        torch.library.wrap_triton(one_row_kernel)[(triton.cdiv(N, block_n),)](
            x, weight, weight if bias is None else bias, x if norm_weight is None else norm_weight,
            y if residual is None else residual, y, N, K, eps, HAS_BIAS=bias is not None,
            NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps)
        return y

    @triton.jit
    def decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, k_cache_ptr, v_cache_ptr,
                                valid_ptr, slot_ptr, y_ptr, m_ptr, l_ptr, S, CHUNK, eps, SCALE: tl.constexpr,
                                NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, GP: tl.constexpr,
                                QK_NORM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                                PRECISION: tl.constexpr):
        """Attention of one new token per row, with its RoPE and cache write. Program (b, h, part) takes the
        NH / NKV query heads of key/value head h in row b: it rotates the new q and k, and attends over the valid
        slots before the new token in its part of the cache (slots part*CHUNK onwards, CHUNK of them), with an
        online softmax over blocks of BLOCK_S slots (flash attention's). Part 0 also writes the new k and v to
        cache slot `slot` and counts the new token itself. The q/k/v row is qkv (B, (NH + 2 NKV) HD); with one
        part, the output y (B, NH HD) is laid out as o_proj reads it; with several (flash-decoding, for long
        caches), y holds each part's unnormalised sum (B NKV SPLITS, GP, HD), m_ptr and l_ptr its running max and
        sum (B NKV SPLITS, GP), for `decode_attention_combine`. Scores and the softmax are fp32; q, k and v round
        where the model rounds."""
        b, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = NH // NKV
        slot = tl.minimum(tl.load(slot_ptr), S - 1).to(tl.int32)
        d = tl.arange(0, HD)  # (HD,)
        turned = (d + HD // 2) % HD  # rotate_half: the other half, negated in the first half
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * HD + d).to(tl.float32)
        row = qkv_ptr + b * (NH + 2 * NKV) * HD
        g = tl.arange(0, GP)
        heads = h * G + g  # (GP,) the query heads, padded to GP
        real = g < G
        q = tl.load(row + heads[:, None] * HD + d[None, :], mask=real[:, None], other=0.0)  # (GP, HD)
        q2 = tl.load(row + heads[:, None] * HD + turned[None, :], mask=real[:, None], other=0.0)
        k = tl.load(row + NH * HD + h * HD + d)  # (HD,)
        k2 = tl.load(row + NH * HD + h * HD + turned)
        v = tl.load(row + (NH + NKV) * HD + h * HD + d)
        if QK_NORM:  # model.RMSNorm over each head, before RoPE
            q_rstd = 1.0 / tl.sqrt(tl.sum(q.to(tl.float32) * q.to(tl.float32), axis=1) / HD + eps)  # (GP,)
            q = (q.to(tl.float32) * q_rstd[:, None]).to(q.dtype) * tl.load(q_norm_ptr + d)[None, :]
            q2 = (q2.to(tl.float32) * q_rstd[:, None]).to(q.dtype) * tl.load(q_norm_ptr + turned)[None, :]
            k_rstd = 1.0 / tl.sqrt(tl.sum(k.to(tl.float32) * k.to(tl.float32), axis=0) / HD + eps)
            k = (k.to(tl.float32) * k_rstd).to(v.dtype) * tl.load(k_norm_ptr + d)
            k2 = (k2.to(tl.float32) * k_rstd).to(v.dtype) * tl.load(k_norm_ptr + turned)
        q = (q.to(tl.float32) * cos[None, :] + sign[None, :] * q2.to(tl.float32) * sin[None, :]).to(v.dtype)
        k = (k.to(tl.float32) * cos + sign * k2.to(tl.float32) * sin).to(v.dtype)
        cache = (b * NKV + h).to(tl.int64) * S * HD  # cache (B, NKV, S, HD)
        first = (d * 0 + part) == 0  # (HD,) the new token belongs to part 0
        tl.store(k_cache_ptr + cache + slot * HD + d, k, mask=first)
        tl.store(v_cache_ptr + cache + slot * HD + d, v, mask=first)
        # the new token first, from registers (part 0); then the slots before it, a block at a time
        mine = (g * 0 + part) == 0  # (GP,)
        m = tl.where(mine, tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * SCALE, float("-inf"))
        total = tl.where(mine, 1.0, 0.0)  # (GP,) the running sum of exp(score - m)
        acc = tl.where(mine[:, None], v.to(tl.float32)[None, :], 0.0)  # (GP, HD)
        lo = part * CHUNK
        hi = tl.minimum(lo + CHUNK, slot)
        for s0 in range(lo, hi, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
            before = slots < hi  # the keys load beside the valid flags, not after them: one wait a block
            ok = before & (tl.load(valid_ptr + b * S + slots, mask=before, other=0) != 0)
            keys = tl.load(k_cache_ptr + cache + slots[:, None] * HD + d[None, :], mask=before[:, None], other=0.0)
            values = tl.load(v_cache_ptr + cache + slots[:, None] * HD + d[None, :], mask=before[:, None], other=0.0)
            values = tl.where(ok[:, None], values, 0.0)
            scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * SCALE  # (GP, BLOCK_S)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a part with nothing valid yet stays at zero
            p = tl.exp(scores - shift[:, None])
            alpha = tl.exp(m - shift)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
            m = m_new
        if SPLITS == 1:
            y = acc / total[:, None]
            tl.store(y_ptr + b * NH * HD + heads[:, None] * HD + d[None, :], y.to(v.dtype), mask=real[:, None])
        else:
            at = (b * NKV + h) * SPLITS + part
            tl.store(y_ptr + (at * GP + g[:, None]) * HD + d[None, :], acc)
            tl.store(m_ptr + at * GP + g, m)
            tl.store(l_ptr + at * GP + g, total)

    @triton.jit
    def decode_attention_combine(part_ptr, m_ptr, l_ptr, y_ptr, NH: tl.constexpr, NKV: tl.constexpr,
                                 HD: tl.constexpr, GP: tl.constexpr, SPLITS: tl.constexpr):
        """The parts of `decode_attention_kernel` for (row b, key/value head h) made one: each part's sum weighed
        by exp(its max - the overall max), over the weighed sums of exp. y (B, NH HD) as o_proj reads it."""
        b, h = tl.program_id(0), tl.program_id(1)
        parts = (b * NKV + h) * SPLITS + tl.arange(0, SPLITS)  # (SPLITS,)
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        m = tl.load(m_ptr + parts[:, None] * GP + g[None, :])  # (SPLITS, GP)
        total = tl.load(l_ptr + parts[:, None] * GP + g[None, :])
        acc = tl.load(part_ptr + (parts[:, None, None] * GP + g[None, :, None]) * HD + d[None, None, :])
        top = tl.max(m, axis=0)  # (GP,) finite: part 0 counts the new token
        w = tl.exp(m - top[None, :])  # (SPLITS, GP); an empty part's max is -inf, its weight 0
        y = tl.sum(acc * w[:, :, None], axis=0) / tl.sum(total * w, axis=0)[:, None]  # (GP, HD)
        real = g < NH // NKV
        heads = h * (NH // NKV) + g
        tl.store(y_ptr + b * NH * HD + heads[:, None] * HD + d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=real[:, None])

    @torch.library.triton_op("mmlora::decode_attention", mutates_args=("k_cache", "v_cache"))
    def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None,
                         k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         valid: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """qkv (B, (nh + 2 n_kv) hd) of one new token a row, cos/sin (B, hd), caches (B, n_kv, S, hd), valid
        (B, S), slot (1,) -> the heads' outputs (B, nh hd); k and v written to the caches at `slot`. A cache of
        more than `SLOTS_A_PROGRAM` slots is split into parts (`PARTS` at most) that run side by side, then combined."""
        B, n_kv, S, hd = k_cache.shape
        nh = qkv.shape[1] // hd - 2 * n_kv
        y = qkv.new_empty(B, nh * hd)
        block, warps = attention_config(hd, qkv.dtype)
        splits = min(PARTS, triton.next_power_of_2(triton.cdiv(S, SLOTS_A_PROGRAM)))  # parts of the cache
        chunk = triton.cdiv(triton.cdiv(S, splits), block) * block
        gp = max(16, triton.next_power_of_2(nh // n_kv))
        parts = m = total = y
        if splits > 1:
            parts = qkv.new_empty(B * n_kv * splits, gp, hd, dtype=torch.float32)
            m, total = (qkv.new_empty(B * n_kv * splits, gp, dtype=torch.float32) for _ in range(2))
        torch.library.wrap_triton(decode_attention_kernel)[(B, n_kv, splits)](
            qkv, cos, sin, cos if q_norm is None else q_norm, cos if k_norm is None else k_norm, k_cache, v_cache,
            valid, slot, parts, m, total, S, chunk, eps, SCALE=hd ** -0.5, NH=nh, NKV=n_kv, HD=hd, GP=gp,
            QK_NORM=q_norm is not None, SPLITS=splits, BLOCK_S=block,
            PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=warps)
        if splits > 1:
            torch.library.wrap_triton(decode_attention_combine)[(B, n_kv)](
                parts, m, total, y, NH=nh, NKV=n_kv, HD=hd, GP=gp, SPLITS=splits, num_warps=8)
        return y


def decode_heads(attn, x, cos, sin, mask=None, cache=None, cache_start=0) -> torch.Tensor:
    """`Attention.heads` for decoding: x (B, T, H) -> (B, T, nh*hd). For one new token a row on the GPU in compiled
    code (the recorded decode step: `cache_start` a (1,) tensor, `mask` the (B, 1, 1, S) valid slots), the q/k/v
    matmul with its norm, then one Triton kernel for RoPE, the cache write and attention (`decode_attention`; a
    second one combines the parts of a long cache); otherwise `Attention.heads`."""
    B, T, _ = x.shape
    hd = attn.head_dim
    if (triton is not None and torch.compiler.is_compiling() and x.is_cuda and T == 1 and cache is not None
            and torch.is_tensor(cache_start) and mask is not None and mask.dtype == torch.bool
            and hd >= 16 and hd & (hd - 1) == 0):
        qkv = attn.qkv.joined(x)  # (B, 1, (nh + 2 n_kv) hd)
        q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (None, None)
        eps = attn.q_norm.eps if attn.qk_norm else 0.0
        y = decode_attention(qkv.view(B, -1), cos.reshape(B, hd), sin.reshape(B, hd), q_norm, k_norm, eps,
                             cache.k, cache.v, mask.reshape(B, -1), cache_start)
        return y.view(B, 1, -1)
    return attn.heads(x, cos, sin, mask, cache, cache_start)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  norm: nn.Module | None = None, swiglu: bool = False, residual: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """F.linear(f(x), weight, bias) (+ residual), where f is the RMSNorm `norm`, or SwiGLU of x = [gate | up]
    (..., 2K) with `swiglu`, or nothing. For one row on the GPU (a decode step at batch 1) in compiled code, one
    Triton kernel does it all, spreading the weight's rows over all the GPU's cores: cuBLAS's kernels for one row
    leave most of them idle on these small weights, and a decode step's norms, activations and adds are each a
    kernel launch of their own otherwise. Eager calls keep torch's ops, whose launches cost the host less."""
    if (triton is not None and torch.compiler.is_compiling() and x.is_cuda and x.numel() == x.shape[-1]
            and weight.is_contiguous()):
        y = one_row_linear(x.reshape(-1), weight, bias, None if norm is None else norm.weight,
                           0.0 if norm is None else norm.eps, swiglu,
                           None if residual is None else residual.reshape(-1))
        return y.view(*x.shape[:-1], -1)
    if norm is not None:
        x = norm(x)
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def one_tensor(parts: list[nn.Parameter]) -> torch.Tensor:
    """The parts concatenated along dim 0; each part becomes a view of the whole, which a matmul then reads in
    place."""
    whole = torch.cat([p.detach() for p in parts])
    for p, view in zip(parts, whole.split([len(p) for p in parts])):
        p.data = view
    return whole


class NormQKV:
    """`Attention.qkv` for decoding: the layer's input RMSNorm, then one matmul over the q, k and v weights (one
    storage). At one token per row a decode step's matmuls are too small to use the GPU's bandwidth, so one matmul
    is faster than three."""

    def __init__(self, norm: nn.Module, layers: list[nn.Linear]):
        self.norm, self.sizes = norm, [layer.out_features for layer in layers]
        self.weight = one_tensor([layer.weight for layer in layers])  # (q + k + v, H)
        self.bias = None if layers[0].bias is None else one_tensor([layer.bias for layer in layers])

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) -> q, k and v side by side, (B, T, q + k + v)."""
        return decode_linear(x, self.weight, self.bias, norm=self.norm)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)


def decode_block(layer, x, cos, sin, mask=None, cache=None, cache_start=0):
    """`DecoderLayer.block` for decoding (`prepare_for_decoding` sets it on each layer): the same computation, with
    each RMSNorm, the SwiGLU and each residual add done by the matmul beside it (`decode_linear`), so that at batch
    1 a layer is four matmul kernels around attention. The input norm is inside `attn.qkv` (`NormQKV`)."""
    o, down = lora.base_linear(layer.self_attn.o_proj), lora.base_linear(layer.mlp.down_proj)
    y = decode_heads(layer.self_attn, x, cos, sin, mask, cache, cache_start)  # (B, T, nh*hd)
    x = decode_linear(y, o.weight, o.bias, residual=x)  # (B, T, H)
    gate_up = decode_linear(x, layer.gate_up_weight, layer.gate_up_bias, norm=layer.post_attention_layernorm)
    return decode_linear(gate_up, down.weight, down.bias, swiglu=True, residual=x)  # (B, T, H)


def prepare_for_decoding(llm) -> None:
    """Merge the LoRA adapters into their base weights, give each layer's q, k, v and its gate, up weights one
    storage each, and run each layer as `decode_block`, the lm_head through `decode_linear`. The model computes
    what it did (the merged model), in place."""
    lora.merge_lora(llm)
    for layer in llm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = NormQKV(layer.input_layernorm, [lora.base_linear(m) for m in (attn.q_proj, attn.k_proj,
                                                                                  attn.v_proj)])
        gate, up = lora.base_linear(mlp.gate_proj), lora.base_linear(mlp.up_proj)
        layer.gate_up_weight = one_tensor([gate.weight, up.weight])  # (2 inner, H)
        layer.gate_up_bias = None if gate.bias is None else one_tensor([gate.bias, up.bias])
        layer.block = functools.partial(decode_block, layer)
    head = lora.base_linear(llm.lm_head)
    llm.lm_head.forward = lambda x: decode_linear(x, head.weight, head.bias)


class GraphDecoder:
    """LLM.decode with fixed shapes, `steps` decode steps recorded as one CUDA graph. The eager step launches a few
    hundred small kernels per token, so at small batches the host sets the pace; replayed, the recorded steps cost
    the host one launch and one read of the tokens per `steps` tokens (gpt-fast records one step with
    torch.compile's "reduce-overhead"; several per graph leave the host less to do). The step's kernels are
    Inductor's and, at batch 1, `decode_linear`'s (torch.compile, once per batch size and cache length). The cache
    slot and the positions live on the device, and the caches and the mask of valid slots are buffers the decoder
    owns, one set per (batch, cache length), so that a recorded graph always finds them at the same address; cache
    lengths are rounded up to `bucket` to keep the shapes few. Sampling is recorded too: it draws from the default
    CUDA generator, so seed that (torch.manual_seed) rather than passing a generator.

    Use: `llm.generate(prompts, n, decoder=GraphDecoder(llm))`. Making one prepares the model for decoding (LoRA
    merged, each layer as `decode_block`: `prepare_for_decoding`). `compile=False` records the eager step as it is
    (vLLM's and gpt-fast's CUDA graphs without the compiler): a recording is a run of the steps, well under a
    second, so there is no compile wait, and the prompt's pass runs eager too; `generate.py --predict` decodes so
    by default on a GPU. `record=False` runs the same steps eagerly, neither compiled nor recorded (what the CPU
    tests check). All recorded graphs share one memory pool: they are replayed one at a time. `prepare=False`
    records the model as it is, its adapters unmerged (training's evaluation: the weights keep their addresses while
    AdamW updates them in place, and a new decoder is made for each evaluation)."""

    def __init__(self, llm, steps: int = 8, bucket: int = 256, record: bool = True, compile: bool = True,
                 prepare: bool = True):
        if llm.config.sliding_window is not None:
            raise ValueError("the recorded decoder does not support a sliding-window model; leave --compile out")
        if prepare:
            prepare_for_decoding(llm)
        self.llm, self.steps, self.bucket, self.record = llm, steps, bucket, record
        compiled = record and compile
        self.step = torch.compile(static_decode, fullgraph=True) if compiled else static_decode
        # the prompt's pass: compiled for any length (dynamic shapes), not recorded
        self.prefill = torch.compile(llm.forward_cached, dynamic=True) if compiled else llm.forward_cached
        self.shapes: dict = {}  # (B, S, dtype) -> (valid (B, S), caches)
        self.graphs: dict = {}  # (B, S, dtype, sampling) -> (graph, token (B, 1), slot (1,), out (B, steps))
        self.pool = None  # the graphs' memory pool

    def buffers(self, B: int, S: int, device, dtype) -> tuple[torch.Tensor, list]:
        S = -(-S // self.bucket) * self.bucket
        if (B, S, dtype) not in self.shapes:
            self.shapes[B, S, dtype] = (torch.zeros(B, S, dtype=torch.bool, device=device),
                                        self.llm.setup_caches(B, S, device, dtype))
        return self.shapes[B, S, dtype]

    def run(self, token: torch.Tensor, valid: torch.Tensor, caches: list, slot: torch.Tensor, out: torch.Tensor,
            pick) -> None:
        """The steps as recorded: from token (B, 1) at cache slot `slot` (1,), write the next tokens to out (B, n)."""
        for j in range(out.shape[1]):
            valid.index_fill_(1, slot, True)
            token = pick(self.step(self.llm, token, valid, caches, slot))[:, None]  # (B, 1)
            out[:, j:j + 1] = token
            slot.add_(1)

    def __call__(self, token: torch.Tensor, valid: torch.Tensor, caches: list, start: int, n: int, pick
                 ) -> torch.Tensor:
        device = token.device
        if not self.record:
            out = torch.empty(token.shape[0], n, dtype=torch.long, device=device)
            self.run(token, valid, caches, torch.full((1,), start, device=device), out, pick)
            return out
        if pick.keywords["generator"] is not None:
            raise ValueError("a recorded decoder samples with the default CUDA generator: seed it with "
                             "torch.manual_seed and pass no generator")
        key = (*valid.shape, caches[0].k.dtype, tuple(pick.keywords.items()))
        if key not in self.graphs:
            self.graphs[key] = self.capture(token, valid, caches, start, pick)
        graph, token_in, slot, out = self.graphs[key]
        token_in.copy_(token)
        slot.fill_(start)
        graph.replay()
        return out.clone()  # the next replay writes `out` again

    def capture(self, token: torch.Tensor, valid: torch.Tensor, caches: list, start: int, pick) -> tuple:
        token_in, slot = token.clone(), torch.full((1,), start, device=token.device)
        out = torch.zeros(token.shape[0], self.steps, dtype=torch.long, device=token.device)
        before = valid.clone()
        side = torch.cuda.Stream()  # compile and warm up off the main stream, as recording wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # these steps write the cache slots that the replay then writes again
                slot.fill_(start)
                self.run(token_in, valid, caches, slot, out, pick)
        torch.cuda.current_stream().wait_stream(side)
        valid.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run(token_in, valid, caches, slot, out, pick)
        self.pool = graph.pool()
        return graph, token_in, slot, out


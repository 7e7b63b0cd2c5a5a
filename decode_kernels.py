"""The Triton kernels of the fast decoder's compiled step (decode.py), as torch ops that torch.compile places in
its graph, and their tile rules. decode.py imports this file only when it compiles a decode step
(`decode.load_kernels`): importing Triton and defining Triton ops loads the compiler.

`one_row_linear`: a matmul of one row with the RMSNorm before it, the SwiGLU before down or the residual add after
it (batch 1); `decode_attention`: RoPE, the cache write and attention of one new token, the cache split over
programs when it is long (flash-decoding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def new_token_qkv(row, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, b, h, eps, NH: tl.constexpr, NKV: tl.constexpr,
                  HD: tl.constexpr, GP: tl.constexpr, QK_NORM: tl.constexpr):
    """The new token's q (GP, HD) for the NH / NKV query heads of key/value head h (padded heads zero) and its k
    and v (HD,), from its q/k/v row `row` ((NH + 2 NKV) HD): each head RMS-normed where the model norms q and k,
    then q and k rotated by RoPE's cos and sin of row b (HD,)."""
    G: tl.constexpr = NH // NKV
    d = tl.arange(0, HD)  # (HD,)
    turned = (d + HD // 2) % HD  # rotate_half: the other half (sin comes with its first half negated)
    cos = tl.load(cos_ptr + b * HD + d).to(tl.float32)
    sin = tl.load(sin_ptr + b * HD + d).to(tl.float32)
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
    q = (q.to(tl.float32) * cos[None, :] + q2.to(tl.float32) * sin[None, :]).to(v.dtype)
    k = (k.to(tl.float32) * cos + k2.to(tl.float32) * sin).to(v.dtype)
    return q, k, v


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
    cache slot slot[b] and counts the new token itself. The q/k/v row is qkv (B, (NH + 2 NKV) HD); with one
    part, the output y (B, NH HD) is laid out as o_proj reads it; with several (flash-decoding, for long
    caches), y holds each part's unnormalised sum (B NKV SPLITS, GP, HD), m_ptr and l_ptr its running max and
    sum (B NKV SPLITS, GP), for `decode_attention_combine`. Scores and the softmax are fp32; q, k and v round
    where the model rounds."""
    b, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.minimum(tl.load(slot_ptr + b), S - 1).to(tl.int32)
    d = tl.arange(0, HD)  # (HD,)
    g = tl.arange(0, GP)
    heads = h * (NH // NKV) + g  # (GP,) the query heads, padded to GP
    real = g < NH // NKV
    row = qkv_ptr + b * (NH + 2 * NKV) * HD
    q, k, v = new_token_qkv(row, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, b, h, eps, NH, NKV, HD, GP, QK_NORM)
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
    (B, S), slot (B,) -> the heads' outputs (B, nh hd); each row's k and v written to the caches at its slot. A cache of
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

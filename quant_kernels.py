"""The Triton kernel that dequantizes an NF4 weight on a GPU (quant.py's `dequantize_nf4`, with the double-quantized
scales' `dequantize_absmax`, in one pass). quant.py imports this file on the first dequantization on a GPU
(`quant.dequantize_kernel`); without Triton (a CPU install) the import fails and torch's ops do the work."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BYTES_A_PROGRAM = 2048  # packed bytes (4,096 weights) per program


@triton.jit
def dequantize_kernel(packed_ptr, absmax_ptr, step_ptr, offset_ptr, levels_ptr, out_ptr, n_bytes,
                      BLOCK_BYTES: tl.constexpr, CHUNK: tl.constexpr, DOUBLE: tl.constexpr, GROUP: tl.constexpr):
    """out[2i], out[2i+1] = the levels of byte i's high and low half, times its block's absmax (fp32), rounded to
    the output's dtype. BLOCK_BYTES: bytes a block of the absmax (block_size / 2); CHUNK: bytes a program. With
    DOUBLE, absmax_ptr holds int8 codes and a block's absmax is code * step + offset, its group's step (GROUP
    blocks a step), rounded after the multiply and after the add as torch's ops round (the launch turns off fused
    multiply-adds)."""
    i = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)  # (CHUNK,) byte indices
    inside = i < n_bytes
    byte = tl.load(packed_ptr + i, mask=inside, other=0).to(tl.int32)
    block = i // BLOCK_BYTES
    if DOUBLE:
        code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.float32)
        scale = code * tl.load(step_ptr + block // GROUP, mask=inside, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    high = tl.load(levels_ptr + (byte >> 4)) * scale
    low = tl.load(levels_ptr + (byte & 15)) * scale
    j = tl.program_id(0).to(tl.int64) * 2 * CHUNK + tl.arange(0, 2 * CHUNK)  # (2 CHUNK,) weight indices
    tl.store(out_ptr + j, tl.interleave(high, low).to(out_ptr.dtype.element_ty), mask=j < 2 * n_bytes)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype, step: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   group: int = 1) -> torch.Tensor:
    """quant.py's dequantization on the GPU: packed (N*K/2,) uint8, the 16 levels (16,) fp32, and absmax
    (N*K/block,) fp32, or with `step` (n_blocks/group,) and `offset` () fp32 the int8 codes of double
    quantization (quant.quantize_absmax) -> (N, K) in `dtype`."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = packed.numel()
    double = step is not None
    dequantize_kernel[(triton.cdiv(n, BYTES_A_PROGRAM),)](
        packed, absmax, step if double else absmax, offset if double else absmax, levels, out, n,
        BLOCK_BYTES=n * 2 // absmax.numel() // 2, CHUNK=BYTES_A_PROGRAM, DOUBLE=double, GROUP=group,
        enable_fp_fusion=False)
    return out

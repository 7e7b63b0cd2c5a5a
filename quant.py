"""4-bit NormalFloat (NF4) for the frozen base: QLoRA (Dettmers et al., arXiv 2305.14314), written out in torch.

    llm = load_llm_nf4("path/to/Qwen2.5-7B", device="cuda", dtype=torch.bfloat16)   # or model.quantize = "nf4"
    apply_lora(llm, rank=16, alpha=32)          # LoRA wraps the NF4 layers as it wraps nn.Linear

A weight (N, K) is cut into blocks of `block_size` (64) consecutive values, row by row. Each block keeps its absmax
(the largest |w|) and each value the index (4 bits) of the nearest of the 16 NF4 levels to w / absmax: the levels
are the quantiles of a normal distribution, scaled to [-1, 1], with an exact zero (the paper's Appendix E; the table
below is bitsandbytes'). Two indices share a byte, the first in the high half. With double quantization the absmax
values (fp32) are themselves quantized: their mean is subtracted, and each group of 256 keeps one fp32 scale and an
int8 per block (the paper uses 8-bit floats there; int8 with a scale is simpler and as small). A block of 64 then
costs 32 bytes of indices and 1 + 4/256 bytes of scale: 4.127 bits a weight.

`NF4Linear` holds one such weight. Its matmul dequantizes the weight into its compute dtype (bf16) for cuBLAS, in
the forward and again in the backward (`NF4Matmul`: the dequantized weight is never kept for the backward, and the
frozen weight gets no gradient). Its `weight` is that dequantized copy, so that code reading `layer.weight` (LoRA's
stacked matmul, the fused q/k/v) computes what it computes on a bf16 base; it cannot be written: merging LoRA into
an NF4 layer is refused, and the export merges against the dequantized weights (`lora.merged_state_dict`).
lm_head and the embeddings stay in the compute dtype.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# the 16 NF4 levels, as in bitsandbytes (functional.py, `get_4bit_type("nf4")`) and the QLoRA paper
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
DQ_GROUP = 256  # absmax values per fp32 scale in double quantization


def check_block(shape: tuple[int, int], block_size: int, where: str) -> None:
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"model.quant_block = {block_size}: a power of two (64, as in QLoRA), at least 2")
    if shape[1] % block_size:
        raise ValueError(f"{where}: its rows of {shape[1]} values are not a whole number of NF4 blocks of "
                         f"{block_size}; set model.quant_block to a power of two that divides {shape[1]} (64 as in "
                         "QLoRA), or model.quantize = \"none\"")


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K), any float dtype -> (packed indices (N*K/2,) uint8, absmax (N*K/block_size,) fp32). Computed in fp32
    on w's device; each value takes the nearest level (the lower one at an exact midpoint)."""
    blocks = w.detach().float().reshape(-1, block_size)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]
    levels = levels_on(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,)
    idx = torch.bucketize(scaled, midpoints).to(torch.uint8).reshape(-1)  # (N*K,) in 0..15
    return (idx[0::2] << 4) | idx[1::2], absmax


@functools.cache
def levels_on(device: torch.device) -> torch.Tensor:
    """NF4_LEVELS (16,) fp32 on `device`, copied there once."""
    return torch.tensor(NF4_LEVELS).to(device)


@functools.cache
def byte_levels(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32 on `device`, made once: the two levels that a packed byte holds, high half first."""
    levels = levels_on(device)
    return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
                   ) -> torch.Tensor:
    """The inverse of `quantize_nf4`: level * absmax in fp32, then cast to `dtype`: (N, K). Each byte looks up its
    two levels at once (`byte_levels`)."""
    pairs = byte_levels(packed.device)[packed.int()]  # (N*K/2, 2)
    return (pairs.view(absmax.shape[0], -1) * absmax[:, None]).to(dtype).view(shape)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: absmax (n,) fp32 -> (int8 codes (n,), an fp32 step per DQ_GROUP values (their largest
    |value| / 127), their fp32 mean). A value is code * step + mean."""
    offset = absmax.mean()
    centred = absmax - offset
    pad = -len(centred) % DQ_GROUP
    groups = F.pad(centred, (0, pad)).reshape(-1, DQ_GROUP)  # (n_groups, 256)
    step = groups.abs().amax(dim=1).clamp(min=1e-12) / 127  # (n_groups,)
    q = torch.round(groups / step[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[:len(centred)]
    return q, step, offset


def dequantize_absmax(q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """code * step, then + offset, each rounded to fp32 (one multiply and one add: what every device computes
    alike, and what the Triton kernel computes)."""
    pad = -len(q) % DQ_GROUP
    groups = F.pad(q.float(), (0, pad)).reshape(-1, DQ_GROUP)
    return (groups * step[:, None]).reshape(-1)[:len(q)] + offset


@functools.cache
def dequantize_kernel():
    """`quant_kernels.dequantize_nf4`, the same dequantization (scales included) as one Triton kernel, where Triton
    imports (a GPU install); else None. torch's ops make several passes and launches, with fp32 in between, where
    the kernel reads the packed bytes and codes once and writes the weight once."""
    try:
        import quant_kernels
    except ImportError:
        return None
    return quant_kernels.dequantize_nf4


class NF4Matmul(torch.autograd.Function):
    """y = x W^T + bias for W dequantized from NF4, in the forward and again in the backward: nothing of W is kept
    between them, and W (frozen) gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        w = layer.dequantized()
        return F.linear(x.to(w.dtype), w, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.layer.dequantized()
        return (dy.to(w.dtype) @ w) if ctx.needs_input_grad[0] else None, None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (see the module's docstring); `dtype` is the compute dtype
    of its matmul and of its bias. Buffers: `packed` (N*K/2,) uint8, and `absmax` (N*K/block,) fp32, or with
    double quantization `absmax_q` int8, `absmax_step` and `absmax_offset` fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.bfloat16, where: str = "a linear layer"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        check_block(tuple(weight.shape), block_size, where)
        self.block_size, self.compute_dtype, self.double_quant = block_size, dtype, double_quant
        packed, absmax = quantize_nf4(weight, block_size)
        self.register_buffer("packed", packed)
        if double_quant:
            q, step, offset = quantize_absmax(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_step", step)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_step, self.absmax_offset)
        return self.absmax

    def dequantized(self) -> torch.Tensor:
        """The weight (N, K) in the compute dtype, made anew: on a GPU with Triton by one kernel that decodes the
        scales too (`dequantize_kernel`); else, and inside torch.compile (whose compiler fuses them), by torch's
        ops."""
        shape = (self.out_features, self.in_features)
        if self.packed.is_cuda and not torch.compiler.is_compiling() and (kernel := dequantize_kernel()) is not None:
            levels = levels_on(self.packed.device)
            if self.double_quant:
                return kernel(self.packed, self.absmax_q, levels, shape, self.compute_dtype, self.absmax_step,
                              self.absmax_offset, DQ_GROUP)
            return kernel(self.packed, self.absmax, levels, shape, self.compute_dtype)
        return dequantize_nf4(self.packed, self.block_absmax(), shape, self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Matmul.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of "
                f"{self.block_size}{', double quantized' if self.double_quant else ''}")


def quantized_linears(llm: nn.Module) -> list[str]:
    """The names of the linear layers that QLoRA stores in NF4: every nn.Linear of the decoder layers (q, k, v, o,
    gate, up, down); lm_head and the embeddings stay in the compute dtype."""
    return sorted(n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}")


def load_llm_nf4(path, device="cpu", dtype: torch.dtype = torch.bfloat16, block_size: int = 64,
                 double_quant: bool = True):
    """`model.load_llm` with the decoder layers' linear weights in NF4, each quantized on `device` as it is read
    from the safetensors files, one tensor at a time: the bf16 base is never whole in memory. Every key and shape is
    checked first, as `load_llm` checks them."""
    from weights import check_tensors, open_safetensors, set_tensor
    from model import llm_skeleton, rope_inv_freq

    llm, files = llm_skeleton(path)
    names = quantized_linears(llm)
    for n in names:
        check_block(tuple(llm.get_submodule(n).weight.shape), block_size, f"{path}: {n}")
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    found = {}
    for f in files:
        with open_safetensors(f) as sf:
            found |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    skip = ("lm_head.weight",) if llm.config.tie_word_embeddings else ()
    check_tensors(expected, found, f"{files[0].parent}: checkpoint does not fit the model config", skip)
    targets = {f"{n}.weight": n for n in names}
    biases = {f"{n}.bias": n for n in names}
    held_bias: dict[str, torch.Tensor] = {}
    held_weight: dict[str, torch.Tensor] = {}

    def place(name: str) -> None:  # a layer is made once its weight (and bias, if it has one) is read
        linear = llm.get_submodule(name)
        if name not in held_weight or (linear.bias is not None and name not in held_bias):
            return
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, NF4Linear(held_weight.pop(name), held_bias.pop(name, None),
                                                            block_size, double_quant, dtype, f"{path}: {name}"))

    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                if key in targets:
                    held_weight[targets[key]] = t.to(device)
                    place(targets[key])
                elif key in biases:
                    held_bias[biases[key]] = t.to(device=device, dtype=dtype)
                    place(biases[key])
                else:
                    set_tensor(llm, key, t.to(device=device, dtype=dtype))
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    llm.inv_freq = rope_inv_freq(llm.config).to(device)
    return llm.eval()


def nf4_bytes(module: nn.Module) -> int:
    """Bytes of the NF4 layers' buffers in `module` (indices and scales)."""
    return sum(b.numel() * b.element_size() for m in module.modules() if isinstance(m, NF4Linear)
               for b in m.buffers())

"""The fast decoder of `generate.py --compile`: opt-in speed machinery for decoding on a GPU, kept apart from the
user's path. LoRA is merged, each layer's q/k/v and gate/up run as one matmul, and the decode step is compiled
and recorded as one CUDA graph for several steps at a time (`GraphDecoder`):

    decoder = GraphDecoder(llm)                        # prepares llm for decoding (in place)
    llm.generate(prompts, 32, decoder=decoder)         # LLM.generate's decode steps, replayed

The compiled step calls two Triton kernels (decode_kernels.py): `one_row_linear`, a matmul of one row with the RMSNorm
before it, the SwiGLU before down or the residual add after it (batch 1), and `decode_attention`, RoPE, the cache
write and attention of one new token. They are loaded only for a compiled decoder (`load_kernels`); the recorded
eager steps and a CPU install (no Triton) run torch's ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora

kernels = None  # decode_kernels.py, once `load_kernels` has imported it


def load_kernels() -> None:
    """Import the Triton kernels of the compiled step (decode_kernels.py), where Triton is installed. Importing
    Triton and defining its torch ops loads the compiler (dynamo, sympy: seconds), which the eager and recorded
    paths do without, so only a compiled decoder calls this."""
    global kernels
    if kernels is None:
        try:
            import decode_kernels as loaded
        except ImportError:  # no Triton: a CPU install
            return
        kernels = loaded


def static_decode(llm, tokens: torch.Tensor, valid: torch.Tensor, caches: list, slot: torch.Tensor) -> torch.Tensor:
    """LLM.decode_step with fixed shapes: the new token (B, 1) goes to cache slot `slot` (1,), attends to every
    valid slot of the whole cache (B, S), and its position is the count of its row's valid slots before it."""
    pos = valid.sum(-1, keepdim=True) - 1  # (B, 1)
    h = llm.hidden_states(llm.model.embed_tokens(tokens), pos, valid[:, None, None, :], caches, slot)  # (B, 1, H)
    return llm.lm_head(h[:, -1]).float()  # (B, V)


def decode_heads(attn, x, cos, sin, mask=None, cache=None, cache_start=0) -> torch.Tensor:
    """`Attention.heads` for decoding: x (B, T, H) -> (B, T, nh*hd). For one new token a row on the GPU in compiled
    code (the recorded decode step: `cache_start` a (1,) tensor, `mask` the (B, 1, 1, S) valid slots), the q/k/v
    matmul with its norm, then one Triton kernel for RoPE, the cache write and attention (`decode_attention`; a
    second one combines the parts of a long cache); otherwise `Attention.heads`."""
    B, T, _ = x.shape
    hd = attn.head_dim
    if (kernels is not None and torch.compiler.is_compiling() and x.is_cuda and T == 1 and cache is not None
            and torch.is_tensor(cache_start) and mask is not None and mask.dtype == torch.bool
            and hd >= 16 and hd & (hd - 1) == 0):
        qkv = attn.qkv.joined(x)  # (B, 1, (nh + 2 n_kv) hd)
        q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (None, None)
        eps = attn.q_norm.eps if attn.qk_norm else 0.0
        y = kernels.decode_attention(qkv.view(B, -1), cos.reshape(B, hd), sin.reshape(B, hd), q_norm, k_norm, eps,
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
    if (kernels is not None and torch.compiler.is_compiling() and x.is_cuda and x.numel() == x.shape[-1]
            and weight.is_contiguous()):
        y = kernels.one_row_linear(x.reshape(-1), weight, bias, None if norm is None else norm.weight,
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
        self.compiled = compiled = record and compile
        if compiled:
            load_kernels()
        self.step = torch.compile(static_decode, fullgraph=True) if compiled else static_decode
        # the prompt's pass: compiled for any length (dynamic shapes), not recorded
        self.prefill = torch.compile(llm.prefill, dynamic=True) if compiled else llm.prefill
        self.shapes: dict = {}  # (B, S, dtype) -> (valid (B, S), caches)
        self.graphs: dict = {}  # (B, S, dtype, sampling) -> (graph, token (B, 1), slot (1,), out (B, steps))
        self.pool = None  # the graphs' memory pool

    def batch_rows(self, B: int) -> int:
        """The rows that a batch of B prompts runs in, recorded: B rounded up to a multiple of 64 (one prompt runs
        alone), so that batches share their graphs (and the attention kernels that cuDNN builds for each shape).
        The extra rows take their share of each sampling step's random draws."""
        return B if B == 1 or not self.record else -(-B // 64) * 64

    def prompt_width(self, P: int) -> int:
        """The width that prompts of up to P tokens are padded to: P rounded up to a quarter of the power of two
        below it (16 at least), so that the prompts' pass sees a few shapes (at most 25% wider)."""
        m = max(16, (1 << (P.bit_length() - 1)) // 4)
        return -(-P // m) * m

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
            # one warm-up run of the eager steps (two of compiled ones, whose second call may compile again);
            # these steps write the cache slots that the replay then writes again
            for _ in range(2 if self.compiled else 1):
                slot.fill_(start)
                self.run(token_in, valid, caches, slot, out, pick)
        torch.cuda.current_stream().wait_stream(side)
        valid.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run(token_in, valid, caches, slot, out, pick)
        self.pool = graph.pool()
        return graph, token_in, slot, out


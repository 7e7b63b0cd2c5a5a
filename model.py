"""Models of mmlora: the decoder LLM, its tokenizer and chat formats, the frozen aligner, projectors, MultimodalLM.

    llm = load_llm("path/to/Qwen2.5-0.5B", device="cuda", dtype=torch.bfloat16)   # HF folder, no transformers
    tok = load_tokenizer("path/to/Qwen2.5-0.5B")                                 # tokenizer.json + chat format
    ids, is_reply = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    out = llm.generate([tok.render(msgs, add_generation_prompt=True)[0]], max_new_tokens=32)

The LLM keeps Hugging Face module names (`model.layers.0.self_attn.q_proj`, ...) so that a checkpoint loads by
plain copy and a LoRA adapter exports to peft's format without renaming. Sections, top to bottom:
LLM config and blocks -> loading -> tokenizer and chat formats -> aligner -> Hugging Face towers (CLIP, SigLIP,
Whisper) -> projectors -> MultimodalLM.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM"}  # config.json's model_type -> the causal LM's architecture


# ----------------------------------------------------------------------------------------------------------------
# LLM config


@dataclass
class LLMConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"}, {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_window: int | None = None  # Mistral v0.1: each token attends to at most this many (itself included)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "LLMConfig":
        """Read a Hugging Face `config.json` dict; unsupported architectures are a clear error. A config without
        `architectures` (as a bare `PretrainedConfig.save_pretrained` writes it) is read by its `model_type`."""
        arch = (cfg.get("architectures") or [MODEL_TYPES.get(cfg.get("model_type"))])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: architecture {arch!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 keeps rope settings in `rope_parameters`; older files use rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
        attention_bias = bool(cfg.get("attention_bias", False))
        qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )


# ----------------------------------------------------------------------------------------------------------------
# LLM blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)  # x * rsqrt(mean(x^2) + eps) in fp32: one kernel on a GPU
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: LLMConfig) -> torch.Tensor:
    """RoPE frequencies (RoFormer, arXiv 2104.09864), with linear or llama3 scaling (Llama 3.1 report, sec. 3.1);
    computed on the CPU, also for a model built on the meta device."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))  # (d/2,)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd) rotated: x * cos + rotate_half(x) * sin, Hugging Face's RoPE, where rotate_half(x) =
    [-x2, x1] for x = [x1, x2]. `sin` (B, T, 1, hd) comes with its first half negated (`LLM.rope`), so the rotated
    half is x rolled by hd/2, [x2, x1], times it: the same values (only signs differ before the product), in one
    kernel where rotate_half takes three."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Preallocated keys and values of one layer for generation.

    `update` writes new keys and values at slots start..start+T-1. With `start` an int it returns the slots filled
    so far; with `start` a (B,) tensor (one new token a row, row b's at slot start[b]) it returns the whole cache,
    whose shapes then never change (what a decode step recorded as a CUDA graph needs): the caller's mask hides the
    slots not yet written."""

    def __init__(self, batch: int, n_kv: int, length: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv, length, head_dim, device=device, dtype=dtype)  # (B, n_kv, S, hd)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_tensor(start):
            at = start.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])  # (B, n_kv, 1, hd)
            self.k.scatter_(2, at, k)
            self.v.scatter_(2, at, v)
            return self.k, self.v
        T = k.shape[2]
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None
           ) -> torch.Tensor:
    """Causal attention: `mask` None (plain causal: SDPA's fused kernels), a bool (B, 1, T, S) tensor, or a
    flex-attention BlockMask (`document_block_mask`)."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def prebuilt_attention():
    """SDPA's flash, memory-efficient and math kernels, not cuDNN's, for generation's passes over prompts and media:
    on a GPU, cuDNN's attention builds and compiles a kernel for each new shape at its first call in a process,
    and those passes change shape from batch to batch, where the others' kernels are built with torch. The decode
    steps, recorded once per shape, keep cuDNN's."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k and v projections of x (B, T, H): (B, T, nh*hd), (B, T, n_kv*hd), (B, T, n_kv*hd).
        `lora.fuse_qkv` replaces this method on an instance with one matmul over the three weights."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_start: int = 0):
        return self.o_proj(self.heads(x, cos, sin, mask, cache, cache_start))

    def heads(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_start: int = 0) -> torch.Tensor:
        """Attention before o_proj: x (B, T, H) -> the heads' outputs side by side, (B, T, nh*hd)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.reshape(B, T, self.n_kv, self.head_dim)  # (B, T, n_kv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.attend(q, k, v.reshape(B, T, self.n_kv, self.head_dim), mask, cache, cache_start)

    def attend(self, q, k, v, mask=None, cache: KVCache | None = None, cache_start: int = 0) -> torch.Tensor:
        """q (B, T, nh, hd) and k (B, T, n_kv, hd) after RoPE, v (B, T, n_kv, hd) -> (B, T, nh*hd). The heads'
        layout is kept and attention runs on transposed views: its output keeps that layout, so that o_proj reads
        it without a copy."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, cache_start)  # (B, n_kv, S, hd)
        y = attend(q, k, v, mask)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        H, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, inner, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(H, inner, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inner, H, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_start=0, checkpointed: bool = False,
                offloaded: bool = False):
        if checkpointed and offloaded:  # the layer's input waits in host memory for the recomputation
            stash = HostStash(x)
            return checkpoint(lambda *a: self.block(stash.take(), *a), cos, sin, mask, use_reentrant=False)
        if checkpointed:  # inside forward, so that a compiled layer compiles the recomputation too
            return checkpoint(self.block, x, cos, sin, mask, use_reentrant=False)
        return self.block(x, cos, sin, mask, cache, cache_start)

    def block(self, x, cos, sin, mask=None, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class HostStash:
    """A checkpointed layer's input (B, T, H), moved to host memory once the layer's forward has it (torchtune's
    activation offloading): `take()` gives the tensor itself the first time (the forward), then a copy back on its
    device (the recomputation in the backward). The copies are queued on the current stream, so they keep its
    order without a sync; the host buffer is pinned, where the tensor is on a GPU."""

    def __init__(self, x: torch.Tensor):
        self.x, self.host, self.device, self.requires_grad = x, None, x.device, x.requires_grad

    def take(self) -> torch.Tensor:
        if self.host is None:
            x, self.x = self.x, None  # this layer no longer holds the device's copy
            self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
            self.host.copy_(x.detach(), non_blocking=x.is_cuda)
            return x
        return self.host.to(self.device, non_blocking=True).requires_grad_(self.requires_grad)


class DecoderBody(nn.Module):
    """`model.*` of a Hugging Face causal LM: embeddings, layers, final norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLM(nn.Module):
    """Decoder-only LLM of the Llama / Qwen2 / Qwen3 / Mistral families. `LLM(input_ids) -> logits (B, T, V)`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)
        self.gradient_checkpointing = False
        self.offload_activations = False  # with gradient_checkpointing: each layer's input waits in host memory

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> "LLM":
        """Hugging Face's initialisation of a new model: N(0, std) weights, norms at one, biases at zero."""
        for n, p in self.named_parameters():
            p.fill_(1.0) if "norm" in n else p.zero_() if n.endswith("bias") else p.normal_(0.0, std)
        return self

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin (B, T, 1, hd) at `position_ids` (B, T), sin with its first half negated, as
        `apply_rope` takes it."""
        freqs = position_ids[:, :, None, None].float() * self.inv_freq.float()  # (B, T, 1, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # (B, T, 1, hd)

    def hidden_states(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None, mask=None,
                      caches: list[KVCache] | None = None, cache_start: int = 0) -> torch.Tensor:
        """Run the layers and the final norm. inputs_embeds (B, T, H) -> (B, T, H).

        `position_ids` (B, T) default to 0..T-1; `mask` as in `attend` (None = causal, which is exact for
        right-padded batches since no real token sees a later pad)."""
        B, T, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + T, device=inputs_embeds.device).expand(B, T)
        window = self.config.sliding_window
        if window is not None and not torch.is_tensor(cache_start) and cache_start + T > window:
            mask = self.sliding_window_mask(mask, position_ids, cache_start + T)
        cos, sin = self.rope(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, caches[i] if caches else None, cache_start, checkpointed,
                      self.offload_activations)
        return self.model.norm(x)

    def sliding_window_mask(self, mask: torch.Tensor | None, position_ids: torch.Tensor, S: int) -> torch.Tensor:
        """`mask` (None = causal) restricted to the last `sliding_window` keys of each query: (B, 1, T, S) bool.
        Keys are the S cached and new positions; a query at step i of the sequence sees keys S-T+i-w < j <= S-T+i."""
        B, T = position_ids.shape
        q = torch.arange(S - T, S, device=position_ids.device)[:, None]  # (T, 1) index of each query among keys
        k = torch.arange(S, device=position_ids.device)[None]  # (1, S)
        band = (k <= q) & (k > q - self.config.sliding_window)  # (T, S)
        return band[None, None] if mask is None else mask & band

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        return self.lm_head(self.hidden_states(x, position_ids, mask))  # (B, T, V)

    def setup_caches(self, batch: int, length: int, device, dtype) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.num_key_value_heads, length, c.head_dim, device, dtype)
                for _ in range(c.num_hidden_layers)]

    def forward_cached(self, x: torch.Tensor, valid: torch.Tensor, caches: list[KVCache], start: int) -> torch.Tensor:
        """Run new tokens x (B, T, H) at cache slots start..start+T-1 and return the logits of the last (B, V).

        `valid` (B, S) marks the cache slots that hold real tokens (left padding does not); each row's positions
        count its real tokens only, so a left-padded prompt is seen as it would be on its own."""
        T = x.shape[1]
        S = start + T
        pos = (valid[:, :S].long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start)  # (T, S)
        mask = (causal[None] & valid[:, None, :S])[:, None]  # (B, 1, T, S)
        h = self.hidden_states(x, pos, mask, caches, start)  # (B, T, H)
        return self.lm_head(h[:, -1]).float()  # (B, V)

    def prefill(self, x: torch.Tensor, last: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """The prompts' pass: x (B, P, H) right-padded, its keys and values to cache slots 0..P-1, and the logits
        (B, V) at `last` (B,), each row's last real position. Causal attention without a mask (SDPA's fused
        kernels): no real token sees the padding after it, and each row's positions start at 0, as on its own."""
        h = self.hidden_states(x, None, None, caches, 0)  # (B, P, H)
        return self.lm_head(h[torch.arange(x.shape[0], device=x.device), last]).float()  # (B, V)

    def decode_step(self, tokens: torch.Tensor, valid: torch.Tensor, caches: list[KVCache], start: int
                    ) -> torch.Tensor:
        """One new token per row, tokens (B, 1), at cache slot `start` -> logits (B, V)."""
        return self.forward_cached(self.model.embed_tokens(tokens), valid, caches, start)

    def decode(self, token: torch.Tensor, valid: torch.Tensor, caches: list[KVCache], start: int, n: int,
               pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`n` decode steps after `token` (B, 1), the last token so far, whose keys go to cache slot `start`:
        returns the next n tokens (B, n), each picked from its logits (B, V) by `pick`."""
        new = []
        for j in range(n):
            valid[:, start + j] = True
            token = pick(self.decode_step(token, valid, caches, start + j))[:, None]  # (B, 1)
            new.append(token)
        return torch.cat(new, 1)

    def embed_prompts(self, prompts: list[list[int]], prompt_embeds: list[torch.Tensor | None] | None, width: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts right-padded to `width` and embedded, (B, width, H), each prompt's embeddings (T_i, H) written
        over its ids' where given; and the prompts' lengths (B,) on the host."""
        B = len(prompts)
        ids = torch.zeros(B, width, dtype=torch.long)  # made on the host, then one copy (not one a row)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        x = self.model.embed_tokens(ids.to(self.lm_head.weight.device))  # (B, width, H)
        given = [(b, e) for b, e in enumerate(prompt_embeds or []) if e is not None]
        if given:  # one copy of them all to their flat positions
            at = torch.cat([torch.arange(len(e)) + b * width for b, e in given]).to(x.device)
            x.view(B * width, -1).index_copy_(0, at, torch.cat([e for _, e in given]).to(x.dtype))
        return x, torch.tensor([len(p) for p in prompts])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
                 prompt_embeds: list[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                 on_token: Callable[[list[int]], None] | None = None, decoder=None) -> list[list[int]]:
        """Generate continuations of a batch of prompts of different lengths, with a KV cache.

        Prompts are right-padded for their pass (causal attention needs no mask there), and the decode steps' mask
        of valid cache slots hides the padding; each row's positions start at 0 on its first token. `temperature=0`
        is greedy; otherwise sampling with optional top-k and top-p (nucleus). A row stops at any of `stop_ids`.
        `prompt_embeds` (one (T_i, H) tensor per prompt) replaces the embedding of the prompt ids, for
        multimodal prompts. `on_token` is called with each row's new token as it comes (for streaming).
        Returns the new tokens of each row, without the stop token.

        The prefill runs the prompts in one call; then the decode steps (`LLM.decode`) make the tokens a few at a
        time (one at a time for `on_token`). `decoder` replaces all of it: an object whose `generate(prompts,
        max_new_tokens, pick, stop_ids, prompt_embeds, on_token)` returns the same, `pick` choosing a token from
        logits (decode.GraphDecoder, which records its decode steps as CUDA graphs)."""
        pick = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if decoder is not None:
            return decoder.generate(prompts, max_new_tokens, pick, stop_ids, prompt_embeds, on_token)
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        n = 1 if on_token else 8
        S = P + -(-(max_new_tokens - 1) // n) * n  # the prompt and every decode step's slot
        valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # cache slots of real tokens
        caches = self.setup_caches(B, S, device, self.model.embed_tokens.weight.dtype)
        x, lengths = self.embed_prompts(prompts, prompt_embeds, P)  # (B, P, H), (B,)
        valid[:, :P] = (torch.arange(P) < lengths[:, None]).to(device)
        with prebuilt_attention():
            tokens = pick(self.prefill(x, (lengths - 1).to(device), caches))[:, None]  # the prompts' pass, (B, 1)
        stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
        shown = 0
        while True:
            if on_token is not None:
                for t in tokens[:, shown:max_new_tokens].T.tolist():
                    on_token(t)
                shown = tokens.shape[1]
            # the host reads the tokens once per call of `decode`, so that it queues the next steps while the GPU
            # runs these; a finished row's extra tokens are cut below
            if tokens.shape[1] >= max_new_tokens or torch.isin(tokens, stops).any(1).all():
                break
            new = self.decode(tokens[:, -1:], valid, caches, P + tokens.shape[1] - 1, n, pick)  # (B, n)
            tokens = torch.cat([tokens, new], 1)
        return [until_stop(row, stop_ids) for row in tokens[:, :max_new_tokens].tolist()]


def until_stop(tokens: list[int], stop_ids) -> list[int]:
    """The tokens before the first of `stop_ids`."""
    return next((tokens[:j] for j, t in enumerate(tokens) if t in stop_ids), tokens)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None
           ) -> torch.Tensor:
    """Pick the next token from logits (B, V): argmax at temperature 0, else top-k / top-p sampling.

    A draw is the argmax of the kept logits plus Gumbel noise, which picks each token with its softmax probability
    (the Gumbel-max trick); unlike torch.multinomial it never waits on the GPU, so a CUDA graph can record it."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(min=1e-20)
    return (logits - (-u.log()).log()).argmax(-1)


# ----------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face folder


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: `model.safetensors` or the shards named by `model.safetensors.index.json`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, "")["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: names shards that are not in the folder: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: holds neither model.safetensors nor model.safetensors.index.json")
    return [single]


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open of one file, on the CPU; a file that is not whole safetensors (cut short by a full disk or a
    killed copy, or another format) is a ValueError naming it, raised where it is opened or read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            yield sf
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be cut short: write it again, or "
                         "copy it again from where it came from") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on the CPU (`open_safetensors`' errors)."""
    with open_safetensors(path) as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str, ignore: tuple[str, ...] = ()
                  ) -> None:
    """Compare tensor names and shapes a module expects with those a file holds; a mismatch is one ValueError
    that starts with `where` and names the missing, unexpected and wrongly shaped tensors (names in `ignore` may
    be absent)."""
    missing = sorted(set(expected) - set(found) - set(ignore))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if missing or extra or wrong:
        parts = [f"{what}: {names[:5]}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("missing tensors", missing), ("unexpected tensors", extra),
                                     ("wrong shapes", wrong)) if names]
        raise ValueError(f"{where}; " + "; ".join(parts))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors (any device, any layout) to one safetensors file, with the metadata transformers expects;
    written under a temporary name and renamed, so the file is whole or absent, and readable by all (0644).
    Tensors that share memory (a module used twice) are written as copies."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    try:
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_hash(module: nn.Module | dict[str, torch.Tensor]) -> str:
    """A short hash of a module's state, or of named tensors (names, shapes and bytes): what a cache of its outputs
    was computed with."""
    h = hashlib.sha256()
    for name, t in sorted((module if isinstance(module, dict) else module.state_dict()).items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state_streaming(module: nn.Module, files: list[Path], device, dtype: torch.dtype | None,
                         skip: tuple[str, ...] = ()) -> None:
    """Copy tensors file by file into a module built on the meta device, after checking every key and shape.

    One tensor at a time is materialised on `device`, so peak host memory stays near one copy of the weights.
    Names in `skip` may be absent from the files (tied weights)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {}
    for f in files:
        with open_safetensors(f) as sf:
            found |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    check_tensors(expected, found, f"{files[0].parent}: checkpoint does not fit the model config (is the folder "
                  "for another model family or size?)", skip)
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                set_tensor(module, key, sf.get_tensor(key).to(device=device, dtype=dtype))


def set_tensor(module: nn.Module, key: str, t: torch.Tensor) -> None:
    """Replace the parameter or buffer `key` (dotted) of `module` with tensor `t`, keeping requires_grad."""
    *path, name = key.split(".")
    owner = module.get_submodule(".".join(path))
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(t, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = t


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Parameters made under it keep their values unset (random init returns its tensor as it is): a skeleton's
    weights are read next. On the meta device, random init runs through torch._refs, whose first call imports the
    compiler (seconds at the start of every generate.py)."""

    RANDOM = (torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_,
              nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RANDOM:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def skeleton():
    """Build modules on the meta device (shapes, no memory, no random values), to load their weights into."""
    with torch.device("meta"), SkipRandomInit():
        yield


def llm_skeleton(path: str | os.PathLike) -> tuple[LLM, list[Path]]:
    """The LLM of a Hugging Face folder built on the meta device (shapes, no memory), and its safetensors files."""
    folder = Path(path)
    cfg = LLMConfig.from_hf(read_json(folder / "config.json", "a Hugging Face model folder needs config.json"),
                            str(folder / "config.json"))
    files = safetensors_files(folder)
    with skeleton():
        llm = LLM(cfg)
    return llm, files


def load_llm(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> LLM:
    """Build an LLM from a Hugging Face folder (config.json + safetensors), on the meta device, then stream weights."""
    llm, files = llm_skeleton(path)
    cfg = llm.config
    skip = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    load_state_streaming(llm, files, device, dtype, skip)
    if cfg.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    llm.inv_freq = rope_inv_freq(cfg).to(device)
    return llm.eval()


def save_llm(llm: LLM, folder: str | os.PathLike, extra_config: dict | None = None,
             state: dict[str, torch.Tensor] | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write an LLM as a Hugging Face folder: config.json and its weights (`state`, default the LLM's own, under
    Hugging Face's names), in one model.safetensors or in shards of at most `max_shard_bytes` with
    model.safetensors.index.json, as transformers writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = llm.config
    family = {arch: t for t, arch in MODEL_TYPES.items()}[c.architecture]
    state = dict(llm.state_dict() if state is None else state)
    dtype = state["model.embed_tokens.weight"].dtype
    cfg = {"architectures": [c.architecture], "model_type": family, "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
           "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
           "attention_bias": c.o_bias or (c.qkv_bias and family != "qwen2"), "mlp_bias": c.mlp_bias,
           "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), "sliding_window": c.sliding_window,
           **(extra_config or {})}
    write_json(folder / "config.json", cfg)
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, size = [{}], 0
    for name, t in state.items():
        if shards[-1] and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    if len(shards) == 1:
        save_tensors(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, folder / name)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, doc: dict) -> None:
    """A JSON file written under a temporary name and renamed (whole or absent), readable by all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and chat formats (written in code; each equals its family's official Jinja template)

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IMAGE_TOKENS = ("<image>", "<|image_pad|>", "<|reserved_special_token_0|>")
# Qwen2.5 has no audio placeholder of its own; its unused <|video_pad|> serves (the model overwrites these positions)
AUDIO_TOKENS = ("<audio>", "<|audio_pad|>", "<|reserved_special_token_1|>", "<|video_pad|>")


# A family's turns: (messages with a system message first if any, format) -> (role, prefix, body, suffix) per turn.
# For an assistant turn, `body` is the reply as trained on: its content and the end-of-turn token.
Turn = tuple[str, str, str, str]


def chatml_turns(msgs: list[dict], fmt: "ChatFormat") -> list[Turn]:
    # Qwen2 / Qwen2.5: <|im_start|>role\ncontent<|im_end|>\n
    return [(m["role"], f"<|im_start|>{m['role']}\n", m["content"] + fmt.end_of_turn, "\n") for m in msgs]


def qwen3_turns(msgs: list[dict], fmt: "ChatFormat") -> list[Turn]:
    # ChatML, and the final reply after the last user turn is marked as given without reasoning
    turns = chatml_turns(msgs, fmt)
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    if msgs and msgs[-1]["role"] == "assistant" and len(msgs) - 1 > last_user:
        role, prefix, _, suffix = turns[-1]
        turns[-1] = (role, prefix + "<think>\n\n</think>\n\n", msgs[-1]["content"].lstrip("\n") + fmt.end_of_turn,
                     suffix)
    return turns


def llama3_turns(msgs: list[dict], fmt: "ChatFormat") -> list[Turn]:
    # Llama 3.x: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, the content stripped
    return [(m["role"], f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", m["content"].strip() + fmt.end_of_turn,
             "") for m in msgs]


def mistral_turns(msgs: list[dict], fmt: "ChatFormat") -> list[Turn]:
    # Mistral-7B-Instruct-v0.3: `[INST] user[/INST] reply</s>`, the system message before the last user turn
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
    msgs = msgs[1:] if system is not None else msgs
    for i, m in enumerate(msgs):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("mistral chat format: roles must alternate user/assistant/user/...")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    turns = []
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            body = f"{system}\n\n{m['content']}" if system is not None and i == last_user else m["content"]
            turns.append(("user", f"[INST] {body}[/INST]", "", ""))
        else:
            turns.append(("assistant", "", " " + m["content"] + fmt.end_of_turn, ""))
    return turns


def plain_turns(msgs: list[dict], fmt: "ChatFormat") -> list[Turn]:
    # a family without a template: `Role: content</s>` per line
    return [(m["role"], f"{m['role'].capitalize()}: ", m["content"] + fmt.end_of_turn, "\n") for m in msgs]


@dataclass
class ChatFormat:
    """How a conversation becomes text: the family's turns (one function each, above), its special strings and
    default system message. An assistant turn's body (content + end-of-turn) is the reply labelled in training,
    so the end-of-turn token is learned."""
    turns: Callable[[list[dict], "ChatFormat"], list[Turn]]
    end_of_turn: str
    generation_prompt: str = ""
    bos: str = ""
    default_system: str | None = None
    eos_ends_turns: bool = False  # the tokenizer's eos token is the end-of-turn token (Mistral, plain)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Return the text and the (start, end) character spans of assistant replies."""
        msgs = list(messages)
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m.get('role')!r}; roles are system, user, assistant")
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        text, spans = self.bos, []
        for role, prefix, body, suffix in self.turns(msgs, self):
            text += prefix
            if role == "assistant":
                spans.append((len(text), len(text) + len(body)))
            text += body + suffix
        if add_generation_prompt:
            text += self.generation_prompt
        return text, spans


CHATML = dict(end_of_turn="<|im_end|>", generation_prompt="<|im_start|>assistant\n")
CHAT_FORMATS = {
    "chatml": ChatFormat(chatml_turns, **CHATML),
    "qwen2.5": ChatFormat(chatml_turns, **CHATML, default_system=QWEN25_SYSTEM),
    "qwen2": ChatFormat(chatml_turns, **CHATML, default_system="You are a helpful assistant."),
    "qwen3": ChatFormat(qwen3_turns, **CHATML),
    "llama3": ChatFormat(llama3_turns, "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         bos="<|begin_of_text|>"),
    "mistral": ChatFormat(mistral_turns, "</s>", bos="<s>", eos_ends_turns=True),
    "plain": ChatFormat(plain_turns, "</s>", "Assistant: ", eos_ends_turns=True),
}


def detect_chat_format(template: str, model_type: str) -> str:
    """Pick a chat format from the official Jinja template's text, else from the model family."""
    if "<think>" in template:
        return "qwen3"
    if "<|im_start|>" in template:
        return "qwen2.5" if QWEN25_SYSTEM in template else "qwen2" if "You are a helpful assistant" in template \
            else "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "mistral"
    return {"qwen2": "qwen2.5", "qwen3": "qwen3", "llama": "llama3", "mistral": "mistral"}.get(model_type, "plain")


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library, with the model family's chat format."""

    def __init__(self, tokenizer, chat_format: str, special: dict[str, str | None], eos_ids: list[int]):
        self.backend = tokenizer  # tokenizers.Tokenizer
        fmt = CHAT_FORMATS[chat_format]
        if fmt.bos and tokenizer.token_to_id(fmt.bos) is None:
            fmt = replace(fmt, bos=special.get("bos") or "")
        if fmt.eos_ends_turns:
            fmt = replace(fmt, end_of_turn=special.get("eos") or fmt.end_of_turn)
        self.chat_format_name, self.chat_format = chat_format, fmt
        self.eos_id = self.token_id(special.get("eos") or fmt.end_of_turn)
        self.end_of_turn_id = self.token_id(fmt.end_of_turn)
        self.pad_id = self.token_id(special["pad"]) if special.get("pad") else self.eos_id
        self.stop_ids = tuple(sorted({self.eos_id, self.end_of_turn_id, *eos_ids}))
        self.image_token = next((t for t in IMAGE_TOKENS if self.backend.token_to_id(t) is not None), None)
        self.audio_token = next((t for t in AUDIO_TOKENS if self.backend.token_to_id(t) is not None), None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no token {token!r}, which its chat format {self.chat_format_name!r} needs")
        return i

    def media_token_id(self, modality: str) -> int:
        token = self.image_token if modality == "image" else self.audio_token
        if token is None:
            names = IMAGE_TOKENS if modality == "image" else AUDIO_TOKENS
            raise ValueError(f"tokenizer has no {modality} placeholder token; add one of {names} as a special token")
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it belongs to an assistant reply."""
        text, spans = self.chat_format.render(messages, add_generation_prompt)
        enc = self.backend.encode(text, add_special_tokens=False)
        offsets = torch.tensor(enc.offsets).view(-1, 2)  # (T, 2) character span of each token
        is_reply = torch.zeros(len(enc.ids), dtype=torch.bool)
        for s, e in spans:  # a token that overlaps a reply is part of it (" A" when the reply is "A")
            is_reply |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
        return enc.ids, is_reply.tolist()


def load_tokenizer(path: str | os.PathLike, chat_format: str | None = None) -> Tokenizer:
    """Read `tokenizer.json` and the special tokens of `tokenizer_config.json` / `generation_config.json`."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: not found; the tokenizer is read from tokenizer.json")
    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tcfg = read_json(folder / "tokenizer_config.json", "") if (folder / "tokenizer_config.json").is_file() else {}
    gcfg = read_json(folder / "generation_config.json", "") if (folder / "generation_config.json").is_file() else {}
    mcfg = read_json(folder / "config.json", "") if (folder / "config.json").is_file() else {}

    def token(name):
        t = tcfg.get(f"{name}_token")
        return t.get("content") if isinstance(t, dict) else t

    eos = gcfg.get("eos_token_id", [])
    eos_ids = eos if isinstance(eos, list) else [eos]
    template = tcfg.get("chat_template") or ""
    template = template if isinstance(template, str) else json.dumps(template)
    fmt = chat_format or detect_chat_format(template, mcfg.get("model_type", ""))
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; known: {', '.join(CHAT_FORMATS)}")
    return Tokenizer(backend, fmt, {"bos": token("bos"), "eos": token("eos"), "pad": token("pad")}, eos_ids)


# ----------------------------------------------------------------------------------------------------------------
# Phase-1 aligner: image and audio encoders whose heads share one aligned space of dimension D


@dataclass
class EncoderConfig:
    width: int = 128  # our own encoder's shape (unused with `hf`)
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    hf: str = ""  # a Hugging Face folder used as this encoder instead: CLIP / SigLIP (image), Whisper (audio)
    layer: int = -1  # with `hf`, an image tower's hidden state to use (-2: LLaVA's choice)


@dataclass
class AlignerConfig:
    """The architecture of a Phase-1 aligner, as `aligner.json` stores it."""
    dim: int = 128  # D, the aligned dimension
    image: EncoderConfig = field(default_factory=EncoderConfig)
    audio: EncoderConfig = field(default_factory=EncoderConfig)
    image_size: int = 32
    patch_size: int = 8
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sample_rate: int = 16000
    clip_seconds: float = 1.0  # audio is cut or zero-padded to this length
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40

    def __post_init__(self):
        if self.audio.hf:  # Whisper hears 30-second windows at 16 kHz
            self.sample_rate, self.clip_seconds = 16000, 30.0

    @classmethod
    def from_dict(cls, d: dict) -> "AlignerConfig":
        d = dict(d)
        for m in ("image", "audio"):
            d[m] = EncoderConfig(**d.get(m, {}))
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_audio_tokens(self) -> int:
        frames = int(self.sample_rate * self.clip_seconds) // self.hop_length + 1
        return (frames + 1) // 2  # the stem's stride-2 convolution


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (bidirectional attention) shared by both encoders."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c.width, hidden), nn.GELU(), nn.Linear(hidden, c.width))

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, W/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, W))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """ViT: patch convolution, class token, learned positions, pre-LN blocks, final LayerNorm."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        c = cfg.image
        self.patch_embed = nn.Conv2d(3, c.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, c.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B, 1+N, W)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:], x[:, 0]  # tokens (B, N, W), pooled (B, W)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, scale: str = "htk") -> torch.Tensor:
    """Triangular mel filters (n_freqs, n_mels) over the one-sided STFT bins: on the HTK mel scale, or "slaney":
    Slaney's scale (linear below 1 kHz, logarithmic above) with area-normalised filters, as librosa and Whisper."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    if scale == "htk":
        mels = torch.linspace(0, 2595.0 * math.log10(1.0 + sample_rate / 2 / 700.0), n_mels + 2)
        hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    else:
        top = sample_rate / 2
        top = top * 3.0 / 200.0 if top < 1000.0 else 15.0 + math.log(top / 1000.0) * 27.0 / math.log(6.4)
        mels = torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64)
        hz = torch.where(mels < 15.0, mels * 200.0 / 3.0, 1000.0 * torch.exp((mels - 15.0) * math.log(6.4) / 27.0))
        freqs = freqs.double()
    lower, center, upper = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lower) / (center - lower)
    down = (upper - freqs[:, None]) / (upper - center)
    filters = torch.clamp(torch.minimum(up, down), min=0.0)
    if scale != "htk":
        filters = filters * (2.0 / (upper - lower))
    return filters.float()


class AudioEncoder(nn.Module):
    """Log-mel features (computed in torch), a strided convolution stem, sinusoidal positions, pre-LN blocks."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        c = cfg.audio
        self.n_fft, self.hop_length = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("mel_filters", mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate), persistent=False)
        self.conv1 = nn.Conv1d(cfg.n_mels, c.width, 3, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, 3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(cfg.num_audio_tokens, c.width), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = spec.abs() ** 2  # (B, n_freqs, frames)
        mel = self.mel_filters.T @ power  # (B, n_mels, frames)
        return torch.log10(mel.clamp(min=1e-10))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.log_mel(wave).to(self.conv1.weight.dtype)  # (B, n_mels, frames)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)  # (B, N, W)
        x = x + self.positions[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, x.mean(1)  # tokens (B, N, W), pooled (B, W)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Fixed sinusoidal positions (Vaswani et al., arXiv 1706.03762). (length, channels)."""
    inv = torch.exp(-math.log(10000.0) * torch.arange(channels // 2) / max(channels // 2 - 1, 1))
    t = torch.arange(length)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


class ModalityTower(nn.Module):
    """One modality's encoder and its head into the aligned space."""

    def __init__(self, encoder: nn.Module, width: int, dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = self.encoder(x)
        return self.head(tokens), F.normalize(self.head(pooled), dim=-1)  # (B, N, D), (B, D)


class Aligner(nn.Module):
    """The frozen Phase-1 aligner: `aligner.image(pixels)` / `aligner.audio(wave)` -> (tokens (B,N,D), pooled (B,D))."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.config = cfg
        for m, ours in (("image", ImageEncoder), ("audio", AudioEncoder)):
            c = getattr(cfg, m)
            encoder = TowerEncoder(c.hf, c.layer, m, cfg.n_mels) if c.hf else ours(cfg)
            setattr(self, m, ModalityTower(encoder, encoder.width if c.hf else c.width, cfg.dim))

    def train(self, mode: bool = True) -> "Aligner":
        return super().train(False)  # frozen: always in eval mode

    def tower_keys(self) -> set[str]:
        """The state of Hugging Face towers, which stays in their folders (aligner.safetensors holds the rest)."""
        return {k for k in self.state_dict() if ".encoder.tower." in k}


def aligner_folder(path: str | os.PathLike) -> Path:
    """A Phase-1 aligner folder, given as itself or as the Phase-1 run's folder that holds it in `aligner/`."""
    folder = Path(path)
    if not (folder / "aligner.json").is_file() and (folder / "aligner" / "aligner.json").is_file():
        return folder / "aligner"
    return folder


def aligner_config(path: str | os.PathLike) -> AlignerConfig:
    """The config of a Phase-1 aligner folder (its aligner.json), or of a Phase-1 run's `aligner/`."""
    return AlignerConfig.from_dict(read_json(aligner_folder(path) / "aligner.json",
                                             "a Phase-1 aligner folder needs aligner.json"))


def load_aligner(path: str | os.PathLike, device="cpu", init_missing: bool = False) -> Aligner:
    """Read a Phase-1 aligner folder (aligner.json + aligner.safetensors), or a Phase-1 run's folder (its
    `aligner/`); returned frozen and in eval mode. With `init_missing` (the start of Phase 1), a folder holding
    aligner.json alone gives a freshly initialised aligner (Hugging Face towers still load from their folders)."""
    folder = aligner_folder(path)
    cfg = aligner_config(folder)
    weights = folder / "aligner.safetensors"
    if not weights.is_file() and not init_missing:
        raise FileNotFoundError(f"{weights}: not found; a Phase-1 aligner folder needs aligner.safetensors")
    # small next to the LLM: built in place, then overwritten by every tensor of the file (no random init for that)
    with SkipRandomInit() if weights.is_file() else contextlib.nullcontext():
        aligner = Aligner(cfg).to(device)
    if weights.is_file():
        load_state_streaming(aligner, [weights], device, torch.float32, skip=tuple(aligner.tower_keys()))
    aligner.requires_grad_(False)
    return aligner.eval()


def save_aligner(aligner: Aligner, folder: str | os.PathLike) -> None:
    """Write a Phase-1 aligner folder: aligner.json (its architecture) and aligner.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "aligner.json", asdict(aligner.config))
    towers = aligner.tower_keys()
    save_tensors({k: v for k, v in aligner.state_dict().items() if k not in towers}, folder / "aligner.safetensors")


def copy_aligner(source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Copy a Phase-1 aligner folder (`aligner_folder(source)`) to `folder` as it is on disk, without building the
    aligner: Hugging Face towers' weights stay in their own folders, which aligner.json names."""
    source, folder = aligner_folder(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = read_json(source / "aligner.json", "a Phase-1 aligner folder needs aligner.json")
    write_json(folder / "aligner.json", doc)
    save_tensors(read_safetensors(source / "aligner.safetensors"), folder / "aligner.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face towers: CLIP / SigLIP vision and Whisper audio encoders, read from their folders, with their
# preprocessing (Hugging Face names throughout, so weights load by plain copy)


class TowerAttention(nn.Module):
    """Bidirectional multi-head attention with q/k/v/out projections (CLIP, SigLIP, Whisper's encoder)."""

    def __init__(self, width: int, heads: int, k_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=k_bias)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = (p(x).view(B, N, self.heads, W // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, N, W/heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, W))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:  # CLIP's activation
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class TowerMLP(nn.Module):
    def __init__(self, width: int, inner: int, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, inner), nn.Linear(inner, width), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """A pre-LN encoder layer of CLIP / SigLIP's vision transformer."""

    def __init__(self, c: dict):
        super().__init__()
        W, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-5)
        self.layer_norm1 = nn.LayerNorm(W, eps=eps)
        self.self_attn = TowerAttention(W, c["num_attention_heads"])
        self.layer_norm2 = nn.LayerNorm(W, eps=eps)
        self.mlp = TowerMLP(W, c["intermediate_size"], ACTIVATIONS[c.get("hidden_act", "quick_gelu")])

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """CLIP's or SigLIP's vision transformer: `tower(pixel_values (B, 3, S, S)) -> (B, N, width)`, transformers'
    `hidden_states[layer]` (CLIP's N counts its class token first; SigLIP has none). For the last layer SigLIP's
    post-layernorm is applied, as its `last_hidden_state` is; CLIP's `last_hidden_state` has none."""

    def __init__(self, c: dict, family: str, layer: int = -1):
        super().__init__()
        W, P, S = c["hidden_size"], c["patch_size"], c["image_size"]
        self.family, self.layer, self.image_size = family, layer, S
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, W, P, stride=P, bias=family == "siglip")
        n = (S // P) ** 2 + (family == "clip")
        self.embeddings.position_embedding = nn.Embedding(n, W)
        if family == "clip":
            self.embeddings.class_embedding = nn.Parameter(torch.zeros(W))
            self.pre_layrnorm = nn.LayerNorm(W, eps=c.get("layer_norm_eps", 1e-5))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(c) for _ in range(c["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(W, eps=c.get("layer_norm_eps", 1e-5))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.patch_embedding(pixels.to(e.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        if self.family == "clip":
            x = torch.cat([e.class_embedding.expand(x.shape[0], 1, -1), x], 1)  # (B, 1 + N, W)
        x = x + e.position_embedding.weight
        if self.family == "clip":
            x = self.pre_layrnorm(x)
        layers = self.encoder.layers
        stop = self.layer % (len(layers) + 1)  # hidden_states[i] is the output of the first i layers
        for layer in layers[:stop]:
            x = layer(x)
        return self.post_layernorm(x) if self.family == "siglip" and stop == len(layers) else x


class WhisperLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        W = c["d_model"]
        self.self_attn_layer_norm = nn.LayerNorm(W)
        self.self_attn = TowerAttention(W, c["encoder_attention_heads"], k_bias=False)
        self.final_layer_norm = nn.LayerNorm(W)
        self.fc1 = nn.Linear(W, c["encoder_ffn_dim"])
        self.fc2 = nn.Linear(c["encoder_ffn_dim"], W)
        self.act = ACTIVATIONS[c.get("activation_function", "gelu")]

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperTower(nn.Module):
    """Whisper's encoder: `tower(input_features (B, n_mels, 3000)) -> (B, 1500, d_model)`, transformers'
    `WhisperEncoder` last_hidden_state."""

    def __init__(self, c: dict):
        super().__init__()
        W = c["d_model"]
        self.conv1 = nn.Conv1d(c["num_mel_bins"], W, 3, padding=1)
        self.conv2 = nn.Conv1d(W, W, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c["max_source_positions"], W)
        self.layers = nn.ModuleList(WhisperLayer(c) for _ in range(c["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(W)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))  # (B, W, 3000)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, 1500, W)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# transformers' defaults for keys a config.json may leave out (google/siglip2-* folders give only a few keys)
TOWER_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "whisper": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
                    max_source_positions=1500, activation_function="gelu"),
}


def tower_weights(folder: Path, anchor: str) -> tuple[list[Path], str, dict[str, tuple]]:
    """The weight files of a Hugging Face folder, the prefix of the tower's keys in them (found from `anchor`, a
    key suffix only the tower has: `CLIPModel` and `CLIPVisionModel` name it differently) and the tower's keys
    with their shapes, read from the headers only."""
    files = safetensors_files(folder)
    shapes = {}
    for f in files:
        with open_safetensors(f) as sf:
            shapes |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    prefix = next((k[: -len(anchor)] for k in sorted(shapes) if k.endswith(anchor)), None)
    if prefix is None:
        raise ValueError(f"{folder}: no tensor named *{anchor}; is it a CLIP / SigLIP / Whisper folder?")
    return files, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def load_tower(module: nn.Module, folder: Path, anchor: str, device, dtype, ignore: tuple[str, ...] = ()) -> None:
    """Copy the tower's tensors (only those: a Whisper decoder or a CLIP text model is never read) into `module`,
    after checking every key and shape."""
    files, prefix, found = tower_weights(folder, anchor)
    found = {k: v for k, v in found.items() if not k.startswith(ignore)}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(expected, found, f"{folder}: the tower's weights (keys {prefix}*) do not fit its config.json")
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                name = key[len(prefix):]
                if key.startswith(prefix) and name in expected:
                    set_tensor(module, name, sf.get_tensor(key).to(device=device, dtype=dtype))


def load_vision_tower(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, layer: int = -1
                      ) -> VisionTower:
    """A CLIP (`CLIPVisionModel`, or the vision part of a `CLIPModel` folder) or SigLIP (`SiglipVisionModel`,
    `SiglipModel`) vision tower from a Hugging Face folder, single or sharded safetensors; frozen, in eval mode.
    `layer` picks the hidden state it returns (-2, the one before the last, is what LLaVA feeds its projector)."""
    folder = Path(path)
    cfg = read_json(folder / "config.json", "a Hugging Face model folder needs config.json")
    family = VISION_TYPES.get(cfg.get("model_type"))
    if family is None:
        raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a supported vision "
                         f"tower; supported: {', '.join(VISION_TYPES)}")
    c = {**TOWER_DEFAULTS[family], **cfg.get("vision_config", cfg)}
    with skeleton():
        tower = VisionTower(c, family, layer)
    load_tower(tower, folder, "embeddings.patch_embedding.weight", device or "cpu", dtype,
               ignore=("head.", "embeddings.position_ids"))
    return tower.requires_grad_(False).eval()


def load_audio_tower(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> WhisperTower:
    """Whisper's encoder from a `WhisperModel` / `WhisperForConditionalGeneration` folder (the decoder's weights
    are not read); frozen, in eval mode."""
    folder = Path(path)
    cfg = read_json(folder / "config.json", "a Hugging Face model folder needs config.json")
    if cfg.get("model_type") != "whisper":
        raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a supported audio "
                         "tower; supported: whisper")
    with skeleton():
        tower = WhisperTower({**TOWER_DEFAULTS["whisper"], **cfg})
    load_tower(tower, folder, "conv1.weight", device or "cpu", dtype)
    return tower.requires_grad_(False).eval()


class TowerEncoder(nn.Module):
    """A Hugging Face tower as one of the aligner's encoders, frozen: (tokens (B, N, width), pooled (B, width)) in
    fp32. Image towers give their patch tokens (CLIP's class token is dropped, as LLaVA does); Whisper takes
    16 kHz waveforms (B, 480000) and computes their log-mel first. Pooled is the tokens' mean."""

    def __init__(self, path: str, layer: int, modality: str, n_mels: int):
        super().__init__()
        self.modality = modality
        self.tower = load_vision_tower(path, layer=layer) if modality == "image" else load_audio_tower(path)
        self.width = self.tower.post_layernorm.normalized_shape[0] if modality == "image" else \
            self.tower.layer_norm.normalized_shape[0]
        if modality == "audio":
            filters = mel_filterbank(400, self.tower.conv1.in_channels, 16000, "slaney")
            self.register_buffer("mel_filters", filters, persistent=False)  # (n_freqs, n_mels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.modality == "audio":
            x = whisper_log_mel(x, self.mel_filters.shape[1], filters=self.mel_filters)  # (B, n_mels, 3000)
        tokens = self.tower(x).float()  # (B, N, width)
        if self.modality == "image" and self.tower.family == "clip":
            tokens = tokens[:, 1:]
        return tokens, tokens.mean(1)


@lru_cache(maxsize=8)
def image_processor(path: str | os.PathLike):
    """The folder's `preprocessor_config.json` as a function: uint8 (3, H, W) -> float (3, S, S), resized (bicubic:
    the shortest edge, or to a fixed size), centre-cropped, rescaled and normalised as CLIPImageProcessor and
    SiglipImageProcessor do, in torch."""
    p = read_json(Path(path) / "preprocessor_config.json", "an image tower's folder needs preprocessor_config.json")
    size = p.get("size", {})
    crop = p.get("crop_size", {}) if p.get("do_center_crop", False) else {}
    mean = torch.tensor(p.get("image_mean", (0.5, 0.5, 0.5))).view(3, 1, 1)
    std = torch.tensor(p.get("image_std", (0.5, 0.5, 0.5))).view(3, 1, 1)

    def process(image: torch.Tensor) -> torch.Tensor:
        x = image.float()[None]  # (1, 3, H, W), 0..255
        H, W = x.shape[-2:]
        if p.get("do_resize", True):
            if "shortest_edge" in size:
                s = size["shortest_edge"]
                out = (s, int(s * W / H)) if H <= W else (int(s * H / W), s)
            else:
                out = (size["height"], size["width"])
            for hw in ((H, out[1]), out):  # width, then height, each pass rounded to 8 bits, as Pillow resamples
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).round()
        if crop:
            top, left = (x.shape[-2] - crop["height"]) // 2, (x.shape[-1] - crop["width"]) // 2
            x = x[..., top:top + crop["height"], left:left + crop["width"]]
        if p.get("do_rescale", True):
            x = x * p.get("rescale_factor", 1 / 255)
        return ((x[0] - mean) / std) if p.get("do_normalize", True) else x[0]
    return process


def whisper_log_mel(wave: torch.Tensor, n_mels: int = 80, sample_rate: int = 16000, n_fft: int = 400,
                    hop_length: int = 160, seconds: int = 30, filters: torch.Tensor | None = None) -> torch.Tensor:
    """WhisperFeatureExtractor in torch: (num_samples,) or (B, num_samples) at 16 kHz, cut or zero-padded to 30 s
    -> log-mel (..., n_mels, 3000) on Slaney's scale, floored 8 (log10 units) below each clip's maximum and scaled
    to about [-1, 1]. `filters` (n_freqs, n_mels), on the wave's device, saves computing them on each call."""
    n = seconds * sample_rate
    wave = F.pad(wave[..., :n].float(), (0, max(0, n - wave.shape[-1])))
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave, n_fft, hop_length, window=window, return_complex=True)
    power = spec[..., :-1].abs() ** 2  # (..., n_freqs, 3000)
    filters = mel_filterbank(n_fft, n_mels, sample_rate, "slaney").to(wave.device) if filters is None else filters
    mel = (filters.T @ power).clamp(min=1e-10).log10()  # (..., n_mels, 3000)
    return (torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0) + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------------------------
# Projectors: aligned features (B, N, D) -> K tokens of the LLM's input space (B, K, H)


class Projector(nn.Module):
    """Linear-GELU-Linear per token (LLaVA-1.5). `tokens="pool"` pools the N encoder tokens to K (adaptive average);
    `tokens="pooled"` projects the pooled embedding once and repeats it K times."""

    def __init__(self, dim: int, hidden: int, out: int, num_tokens: int, mode: str = "pool"):
        super().__init__()
        if mode not in ("pool", "pooled"):
            raise ValueError(f"projector mode {mode!r}: use 'pool' or 'pooled'")
        self.num_tokens, self.mode = num_tokens, mode
        self.linear_1 = nn.Linear(dim, hidden)
        self.linear_2 = nn.Linear(hidden, out)

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool":
            x = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_tokens).transpose(1, 2)  # (B, K, D)
        else:
            x = pooled[:, None].expand(-1, self.num_tokens, -1)  # (B, K, D)
        return self.linear_2(F.gelu(self.linear_1(x)))  # (B, K, H)


# ----------------------------------------------------------------------------------------------------------------
# The typed batch MultimodalLM reads (data.collate makes it; data.py names it data.Batch too)

@dataclass
class Media:
    """One modality's media of a sample or a batch: the inputs of the aligner, or its cached outputs, and the
    placeholder positions their projected features go to. N media of K placeholder tokens each."""
    slots: torch.Tensor  # (c*N*K,) int64: placeholder positions, in order (within the sample, or flat b*T+t in a
    # batch); c = 1, or c copies of the media's slots where c rows share them (a preference batch: chosen and rejected)
    raw: torch.Tensor | None = None  # images (N, 3, S, S) float32 normalised, or audio (N, samples) float32
    tokens: torch.Tensor | None = None  # cached aligner token features (N, n, D) float32
    pooled: torch.Tensor | None = None  # cached pooled aligner features (N, D) float32

    def __len__(self) -> int:  # N
        return (self.raw if self.raw is not None else self.tokens).shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.slots, self.raw, self.tokens, self.pooled) if t is not None]


@dataclass
class Batch:
    """S samples collated into B rows of T tokens (B == S when padded; B <= S when packed).

    The host finds every position the model indexes by (labels, placeholders), so that the GPU never reports a
    count back during a step: `label_index` lists the M labelled positions of the flattened (B*T) batch, and each
    modality's `Media.slots` its placeholder positions there."""
    input_ids: torch.Tensor  # (B, T) int64, pad_id after each row's `lengths` tokens
    labels: torch.Tensor  # (B, T) int64: labels[b, t] is the target of position t, -100 where there is none
    label_index: torch.Tensor  # (M,) int64: flat positions b*T+t with a label
    label_weight: torch.Tensor  # (M,) float32: 1.0, or 0.0 at the padding of `pad_static`
    sample_index: torch.Tensor  # (B, T) int64: the sample (0..S-1) each position belongs to (0 on padding)
    modality: torch.Tensor  # (S, 2) bool: whether each sample holds an image, audio (MODALITIES' order)
    lengths: list[int]  # (B,) real tokens per row, on the host
    ids: list[str]  # (S,) sample ids
    media: dict[str, Media] = field(default_factory=dict)  # modality -> the batch's media, for those present
    position_ids: torch.Tensor | None = None  # (B, T) int64, packed rows: positions restart at 0 for each sample
    doc_ids: torch.Tensor | None = None  # (B, T) int64, packed rows: the sample of each position, -1 on padding
    skipped: list[dict] = field(default_factory=list)  # samples that failed to decode (file, line, id, reason)

    def apply(self, fn) -> "Batch":
        """A batch with `fn` applied to every tensor (host lists are shared)."""
        def f(t):
            return None if t is None else fn(t)
        return replace(self, input_ids=fn(self.input_ids), labels=fn(self.labels), label_index=fn(self.label_index),
                       label_weight=fn(self.label_weight), sample_index=fn(self.sample_index),
                       modality=fn(self.modality), position_ids=f(self.position_ids), doc_ids=f(self.doc_ids),
                       media={m: Media(fn(x.slots), f(x.raw), f(x.tokens), f(x.pooled)) for m, x in self.media.items()})

    def to(self, device: torch.device | str) -> "Batch":
        return self.apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this on each batch
        return self.apply(lambda t: t.pin_memory())

    def count(self) -> torch.Tensor:
        """What the loss is averaged over: the labelled tokens. () float32."""
        return self.label_weight.sum()

    def groups(self) -> torch.Tensor:
        """(3, S) bool: the samples that are text-only, hold an image, hold audio (GROUPS["instruct"]), for the
        loss of each."""
        return torch.stack([~self.modality.any(1), self.modality[:, 0], self.modality[:, 1]])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, in a fixed order (the inputs of a recorded CUDA graph)."""
        fixed = [self.input_ids, self.labels, self.label_index, self.label_weight, self.sample_index, self.modality]
        packed = [t for t in (self.position_ids, self.doc_ids) if t is not None]
        return fixed + packed + [t for m in MODALITIES if m in self.media for t in self.media[m].tensors()]

    def pad_static(self, multiple: int) -> "Batch":
        """The same batch in few shapes, for a training step recorded as a CUDA graph (padded rows only).

        `label_index` is padded to a multiple of the row length at weight 0 (the padding adds nothing to the loss,
        the token counts or the gradients), and each modality's media to a multiple of the number of rows, with
        their features written to a scratch position: the batch's last one, a pad token that no real token attends
        to (rows are widened by `multiple` columns if none is left). Only shapes and `lengths` are read, so a batch
        already on the GPU is padded without waiting for it; a batch with nothing to pad is returned as it is."""
        if self.doc_ids is not None:
            raise ValueError("static shapes are for padded rows; packed rows vary in number")
        b = self
        B, T = b.input_ids.shape
        if any(len(x) % B for x in b.media.values()) and max(b.lengths) == T:  # media to pad and no scratch position:
            def widen(t):  # widen every row, and move the flat positions with it
                return F.pad(t, (0, multiple), value=-100 if t is b.labels else 0)

            def move(flat):
                return flat // T * (T + multiple) + flat % T
            b = replace(b, input_ids=widen(b.input_ids), labels=widen(b.labels), sample_index=widen(b.sample_index),
                        label_index=move(b.label_index),
                        media={m: replace(x, slots=move(x.slots)) for m, x in b.media.items()})
            T += multiple
        scratch = B * T - 1
        if extra := -len(b.label_index) % T:
            b = replace(b, label_index=torch.cat([b.label_index, b.label_index.new_full((extra,), scratch)]),
                        label_weight=torch.cat([b.label_weight, b.label_weight.new_zeros(extra)]))
        media = dict(b.media)
        for m, x in b.media.items():
            if extra := -len(x) % B:
                def grow(t):
                    return None if t is None else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])
                slots = torch.cat([x.slots, x.slots.new_full((extra * len(x.slots) // len(x),), scratch)])
                media[m] = Media(slots, grow(x.raw), grow(x.tokens), grow(x.pooled))
        return replace(b, media=media)


# ----------------------------------------------------------------------------------------------------------------
# MultimodalLM: frozen aligner -> projectors -> LLM with LoRA, loss only at labelled positions

MODALITIES = ("image", "audio")


def cross_entropy_chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool):
    """Loss (c,) of one chunk of hidden states (c, H) against targets (c,), and its gradient (c, H) if asked."""
    logits = (h.to(weight.dtype) @ weight.T).float()  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, t[:, None])[:, 0]
    if not need_grad:
        return loss, None
    p = torch.exp(logits - lse[:, None])  # softmax
    p = p - (torch.arange(logits.shape[1], device=t.device) == t[:, None]).to(p.dtype)  # minus the one-hot targets
    return loss, (p.to(weight.dtype) @ weight).float()


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T` without a (M, V) logits tensor.

    The forward walks M in chunks, and for each chunk computes the loss and the gradient with respect to the
    hidden states, (softmax - onehot) @ weight, so the backward is one multiply. Peak memory is one chunk's
    logits instead of all of them. The weight (the frozen lm_head) gets no gradient. `fn` computes one chunk
    (`cross_entropy_chunk`, or a compiled version of it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                fn: Callable = cross_entropy_chunk) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        losses, grads = [], []
        for s in range(0, hidden.shape[0], chunk):
            loss, grad = fn(hidden[s:s + chunk], weight, targets[s:s + chunk], need_grad)
            losses.append(loss)
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads) if need_grad and grads else None)
        ctx.hidden_dtype = hidden.dtype
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)  # (M,)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses[:, None]).to(ctx.hidden_dtype), None, None, None, None


@dataclass
class LossOutput:
    """What `MultimodalLM.forward` returns: summed losses, so that the caller divides by the labelled tokens of
    the whole step (all micro-batches, all ranks) and accumulation and data parallelism stay exact."""
    loss_sum: torch.Tensor  # () float32, differentiable: the loss summed over the labelled tokens
    n_tokens: torch.Tensor  # () float32: labelled tokens (the sum of Batch.label_weight)
    sample_loss: torch.Tensor  # (S,) float32: each sample's summed loss, in Batch.ids' order (DPO's sequence
    # log-probabilities, with their gradient)
    sample_tokens: torch.Tensor  # (S,) float32: each sample's labelled tokens


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """Causal attention within each sample of packed rows: doc (B, T), the sample of each position -> (B, 1, T, T)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def document_block_mask(doc: torch.Tensor, block: int = 128) -> BlockMask:
    """`document_mask` as flex attention's BlockMask: compiled, flex attention skips the blocks of 128 x 128 that
    the mask hides (those across samples, beside those above the diagonal) rather than computing and masking them.

    The blocks are read off each block's first and last sample id (a few small ops on (B, T/128) tensors, where
    `create_block_mask` evaluates the mask at every one of the B*T*T positions): samples follow each other along a
    row, so the ids only grow once padding's -1 is numbered after them."""

    def same_sample_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)
    B, T = doc.shape
    if T % block:
        return create_block_mask(same_sample_causal, B, None, T, T, device=doc.device)
    ids = torch.where(doc < 0, doc.max() + 1, doc).view(B, T // block, block)
    first, last = ids[..., 0], ids[..., -1]  # (B, n) the first and last sample of each block
    lower = torch.ones(T // block, T // block, dtype=torch.bool, device=doc.device).tril()  # (n_q, n_kv)
    # kv block j <= q block i holds a key for some query of block i when its last sample reaches block i's first;
    # every pair is allowed when both blocks lie in one sample, j before i (the diagonal blocks need causality)
    some = (last[:, None, :] >= first[:, :, None]) & lower  # (B, n_q, n_kv)
    full = (first[:, None, :] == last[:, :, None]) & lower.tril(-1)
    partial = some & ~full

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The count (B, 1, n_q) and the indices (B, 1, n_q, n_kv), chosen ones first, of each row's kv blocks."""
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], indices.to(torch.int32)[:, None]
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=same_sample_causal)


class MultimodalLM(nn.Module):
    """Frozen aligner + trainable projectors + LLM (frozen base, LoRA adapters).

    `forward(batch)` takes a `data.Batch` and returns a `LossOutput`; `generate(batch)` answers prompts."""

    def __init__(self, llm: LLM, aligner: Aligner, projectors: nn.ModuleDict, media_token_ids: dict[str, int],
                 loss_chunk: int = 512):
        super().__init__()
        self.llm, self.aligner, self.projectors = llm, aligner, projectors
        self.media_token_ids = media_token_ids
        self.loss_chunk = loss_chunk
        self.chunk_loss = cross_entropy_chunk  # one chunk of the loss; a caller may put a compiled version here
        # packed rows' mask: dense for SDPA; a caller compiling the layers may put one giving flex attention's
        # `document_block_mask` here (train.training_document_mask)
        self.document_mask = document_mask

    def media_embeds(self, batch: Batch, modality: str, chunk: int = 0) -> torch.Tensor:
        """Projected features (N, K, H) of the batch's media of one modality, from cached features or raw media.
        With `chunk`, the aligner sees the raw media in calls of exactly `chunk` (the last padded with zeros), so
        that one shape serves every batch: a GPU's kernels set up each new shape on its first call."""
        media = batch.media[modality]
        if media.raw is None:  # the feature cache: the aligner already ran
            tokens, pooled = media.tokens, media.pooled  # (N, n, D), (N, D)
        else:
            encode = getattr(self.aligner, modality)
            with torch.no_grad():
                if not chunk:
                    tokens, pooled = encode(media.raw)  # (N, n, D), (N, D)
                else:
                    N = len(media)
                    raw = torch.cat([media.raw, media.raw.new_zeros(-N % chunk, *media.raw.shape[1:])])
                    outs = [encode(part) for part in raw.split(chunk)]
                    tokens, pooled = (torch.cat(t)[:N] for t in zip(*outs))  # (N, n, D), (N, D)
        return self.projectors[modality](tokens, pooled)

    def embed(self, batch: Batch, media_chunk: int = 0) -> torch.Tensor:
        """Token embeddings with projected media written into the placeholder positions: (B, T, H); `media_chunk`
        as `media_embeds`' chunk."""
        x = self.llm.model.embed_tokens(batch.input_ids)  # (B, T, H)
        for m in batch.media:
            feats = self.media_embeds(batch, m, media_chunk)  # (N, K, H)
            slots = batch.media[m].slots  # (c*N*K,) flat positions of the placeholders, found by the collator
            copies = slots.shape[0] // max(1, feats.shape[0] * feats.shape[1])  # rows that share each medium
            if copies < 1 or slots.shape[0] != copies * feats.shape[0] * feats.shape[1]:
                raise ValueError(f"batch has {slots.shape[0]} {m} placeholder tokens for {feats.shape[0]} {m} "
                                 f"inputs of {feats.shape[1]} tokens each")
            feats = feats.flatten(0, 1).repeat(copies, 1)  # (c*N*K, H)
            # index_put's backward is a gather; masked_scatter's (a masked_select) would make the host wait mid-backward
            x = x.flatten(0, 1).index_put((slots,), feats.to(x.dtype)).view_as(x)
        return x

    def attention_mask(self, batch: Batch) -> torch.Tensor | BlockMask | None:
        """None (causal) for padded batches; for packed ones a document mask: no attention across samples."""
        return None if batch.doc_ids is None else self.document_mask(batch.doc_ids)

    def forward(self, batch: Batch) -> LossOutput:
        # position t predicts token t+1; labels were shifted by the collator: labels[t] is the target at t.
        labels = batch.labels.flatten()  # (B*T,)
        where = batch.label_index  # (M,) flat positions with a label, found by the collator
        x = self.embed(batch)
        h = self.llm.hidden_states(x, batch.position_ids, self.attention_mask(batch))  # (B, T, H)
        h = h.flatten(0, 1).index_select(0, where)  # (M, H)
        weight = batch.label_weight  # (M,) 1.0, or 0.0 where Batch.pad_static padded label_index
        losses = LinearCrossEntropy.apply(h, self.llm.lm_head.weight, labels[where].clamp(min=0), self.loss_chunk,
                                          self.chunk_loss)
        losses = losses * weight  # (M,)
        sample_of = batch.sample_index.flatten()[where]  # (M,)
        S = batch.modality.shape[0]
        sample_loss = torch.zeros(S, device=h.device).index_add(0, sample_of, losses)
        sample_tokens = torch.zeros(S, device=h.device).index_add(0, sample_of, weight)
        return LossOutput(losses.sum(), weight.sum(), sample_loss, sample_tokens)

    @torch.no_grad()
    def prompt_inputs(self, batch: Batch, media_chunk: int | None = None
                      ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """A collated batch of prompts (right-padded) as `LLM.generate` takes them: each prompt's ids and its
        embeddings (T_i, H), media projected in. The aligner's calls take `media_chunk` media each (`media_embeds`;
        default 64 on a GPU, where a new shape costs its kernels' set-up, and the whole batch on a CPU)."""
        ids = batch.input_ids.tolist()  # one read, before the aligner is queued: the host does not wait for it
        if media_chunk is None:
            media_chunk = 64 if batch.input_ids.is_cuda else 0
        with prebuilt_attention():
            x = self.embed(batch, media_chunk)
        return [ids[b][:n] for b, n in enumerate(batch.lengths)], [x[b, :n] for b, n in enumerate(batch.lengths)]

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 32, media_chunk: int | None = None, **kw
                 ) -> list[list[int]]:
        """Answer a collated batch of prompts (right-padded) with their media; `kw` as in `LLM.generate`."""
        prompts, embeds = self.prompt_inputs(batch, media_chunk)
        return self.llm.generate(prompts, max_new_tokens, prompt_embeds=embeds, **kw)

    @torch.no_grad()
    def answer_batches(self, batches: Iterable[tuple[list, Batch]], max_new_tokens: int = 32,
                       stop_ids: tuple[int, ...] = (), decoder=None, rows: int = 256, slots: int | None = None,
                       **sampling) -> Iterator[list[tuple]]:
        """Answers to a stream of prompt batches, as they are ready: `batches` yields (keys, a collated batch), and
        this yields lists of (key, new tokens without the stop token); `sampling` as in `LLM.generate`. Without a
        decoder a batch is answered whole (`generate`); a decoder's `stream` takes prompts in as its rows free up
        (continuous batching, at most `rows` rows and `slots` cache slots: decode.GraphDecoder)."""
        if decoder is None:
            for keys, batch in batches:
                yield list(zip(keys, self.generate(batch, max_new_tokens, stop_ids=stop_ids, **sampling)))
            return

        def prompts():
            for keys, batch in batches:
                yield list(zip(keys, *self.prompt_inputs(batch)))
        yield from decoder.stream(prompts(), max_new_tokens, partial(sample, **sampling), stop_ids, rows, slots)


def parameter_report(groups: dict[str, list[nn.Parameter]]) -> str:
    """Total / trainable / frozen parameters by part, as a table (a tensor shared by two parts counted once)."""
    rows, seen, tot = [], set(), [0, 0]
    for name, params in groups.items():
        t = f = 0
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            t, f = (t + p.numel(), f) if p.requires_grad else (t, f + p.numel())
        rows.append((name, t + f, t, f))
        tot = [tot[0] + t, tot[1] + f]
    rows.append(("total", tot[0] + tot[1], tot[0], tot[1]))
    lines = [f"{'part':<12}{'total':>15}{'trainable':>15}{'frozen':>15}"]
    lines += [f"{n:<12}{a:>15,}{b:>15,}{c:>15,}" for n, a, b, c in rows]
    pct = 100.0 * tot[0] / max(tot[0] + tot[1], 1)
    return "\n".join(lines) + f"\ntrainable: {pct:.2f}% of all parameters"

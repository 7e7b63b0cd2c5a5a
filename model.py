"""The decoder LLM: config, blocks, KV cache, sampling, generation, and reading and writing a Hugging Face folder.

    llm = load_llm("path/to/Qwen2.5-0.5B", device="cuda", dtype=torch.bfloat16)   # HF folder, no transformers
    out = llm.generate([ids], max_new_tokens=32)                                  # KV cache, greedy or sampled

The LLM keeps Hugging Face module names (`model.layers.0.self_attn.q_proj`, ...) so that a checkpoint loads by
plain copy and a LoRA adapter exports to peft's format without renaming. Its tokenizer and chat formats live in
tokenizer.py, the weights' files in weights.py, and the multimodal model around it in multimodal.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from weights import load_state_streaming, read_json, safetensors_files, save_tensors, skeleton, write_json

if TYPE_CHECKING:  # flex attention imports the compiler stack: loaded only where a BlockMask is made
    from torch.nn.attention.flex_attention import BlockMask

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
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention  # a BlockMask: its module is loaded already

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


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
        self.fused_qkv = None  # a module installed here computes q, k and v in one call (lora.fuse_qkv)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_start: int = 0):
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hd), (B, T, n_kv*hd) twice
        return self.o_proj(self.heads(q, k, v, cos, sin, mask, cache, cache_start))

    def heads(self, q, k, v, cos, sin, mask=None, cache: KVCache | None = None, cache_start: int = 0) -> torch.Tensor:
        """The projections q (B, T, nh*hd), k and v (B, T, n_kv*hd) -> attention before o_proj, the heads' outputs
        side by side (B, T, nh*hd): the q and k norms (Qwen3), RoPE, attention."""
        B, T, _ = q.shape
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

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, caches[i] if caches else None, cache_start)
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

        `valid` (B, S) marks the cache slots that hold real tokens (a shorter prompt's padding does not); each row's
        positions count its real tokens only, so a padded prompt is seen as it would be on its own."""
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


def save_llm(llm: LLM, folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
             max_shard_bytes: int = 5 * 10**9) -> None:
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
           "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), "sliding_window": c.sliding_window}
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



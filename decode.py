"""The fast decoder of `generate.py` on a GPU: opt-in speed machinery for decoding, kept apart from the plain path
(`LLM.generate`'s own steps). LoRA is merged, each layer's q/k/v and gate/up run as one matmul (`DecodeLayer`),
several decode steps at a time are recorded as one CUDA graph (eager, or compiled first with --compile), and a
dataset's prompts take the rows that finished answers free (continuous batching; `GraphDecoder.stream`, its rows'
books kept by `Scheduler`):

    decoder = choose_decoder(llm)                      # what every entry point decodes with (None on a CPU)
    decoder = GraphDecoder(llm)                        # or made directly: prepares llm for decoding (in place)
    llm.generate(prompts, 32, decoder=decoder)         # one batch, its decode steps replayed
    for finished in decoder.stream(batches, 32, pick, stop_ids):   # [(key, tokens), ...] as rows finish
        ...

A server feeds `stream` from requests that arrive at any time (serve.py): each row then has its own sampling and
run (`RowSettings`, `sample_rows`), and the server ends rows early (a client gone, a stop string).

The compiled step calls two Triton kernels (decode_kernels.py): `one_row_linear`, a matmul of one row with the RMSNorm
before it, the SwiGLU before down or the residual add after it (batch 1), and `decode_attention`, RoPE, the cache
write and attention of one new token. They are loaded only for a compiled decoder (`load_kernels`); the recorded
eager steps and a CPU install (no Triton) run torch's ops.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from model import apply_rope, prebuilt_attention
from quant import NF4Linear

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


def static_decode(llm, tokens: torch.Tensor, caches: list, slot: torch.Tensor) -> torch.Tensor:
    """LLM.decode_step with fixed shapes: row b's new token (B, 1) goes to its cache slot slot[b] (slot (B,)) and
    attends to the slots up to it over the whole cache (B, S); its position is the slot itself, each row's prompt
    filling the slots from 0 on."""
    S = caches[0].k.shape[2]
    mask = torch.arange(S, device=slot.device) <= slot[:, None]  # (B, S)
    h = llm.hidden_states(llm.model.embed_tokens(tokens), slot[:, None], mask[:, None, None, :], caches, slot)
    return llm.lm_head(h[:, -1]).float()  # (B, V)


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


class DecodeLayer(nn.Module):
    """A decoder layer for decoding, which `prepare_for_decoding` puts in the layer's place: the layer's own modules
    under their names, its q, k and v weights in one storage and its gate and up weights in another, and each
    RMSNorm, the SwiGLU and each residual add done by the matmul beside it (`decode_linear`), so that at batch 1 a
    layer is four matmul kernels around attention. It computes what the layer computes (with LoRA merged)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        attn, mlp = self.self_attn, self.mlp
        q, k, v = (lora.base_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.qkv_sizes = [q.out_features, k.out_features, v.out_features]
        self.qkv_weight = one_tensor([q.weight, k.weight, v.weight])  # (q + k + v, H)
        self.qkv_bias = None if q.bias is None else one_tensor([q.bias, k.bias, v.bias])
        gate, up = lora.base_linear(mlp.gate_proj), lora.base_linear(mlp.up_proj)
        self.gate_up_weight = one_tensor([gate.weight, up.weight])  # (2 inner, H)
        self.gate_up_bias = None if gate.bias is None else one_tensor([gate.bias, up.bias])

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The input RMSNorm, then q, k and v side by side: x (B, T, H) -> (B, T, q + k + v). At one token a row a
        decode step's matmuls are too small to use the GPU's bandwidth, so one matmul is faster than three."""
        return decode_linear(x, self.qkv_weight, self.qkv_bias, norm=self.input_layernorm)

    def heads(self, x, cos, sin, mask=None, cache=None, cache_start=0) -> torch.Tensor:
        """`Attention.heads` of the normed x's q, k and v: x (B, T, H) -> (B, T, nh*hd). For one new token a row on
        the GPU in compiled code (the recorded decode step: `cache_start` the (B,) slots, `mask` the (B, 1, 1, S)
        valid slots), the q/k/v matmul with its norm, then one Triton kernel for RoPE, the cache write and attention
        (`decode_attention`; a second one combines the parts of a long cache). Otherwise, without q/k norms, RoPE
        runs once on q and k side by side; else `Attention.heads`."""
        attn = self.self_attn
        B, T, _ = x.shape
        hd, nh, n_kv = attn.head_dim, attn.n_heads, attn.n_kv
        qkv = self.qkv(x)  # (B, T, (nh + 2 n_kv) hd)
        if (kernels is not None and torch.compiler.is_compiling() and x.is_cuda and T == 1 and cache is not None
                and torch.is_tensor(cache_start) and mask is not None and mask.dtype == torch.bool
                and hd >= 16 and hd & (hd - 1) == 0):
            q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (None, None)
            eps = attn.q_norm.eps if attn.qk_norm else 0.0
            y = kernels.decode_attention(qkv.view(B, -1), cos.reshape(B, hd), sin.reshape(B, hd), q_norm, k_norm,
                                         eps, cache.k, cache.v, mask.reshape(B, -1), cache_start)
            return y.view(B, 1, -1)
        if attn.qk_norm:
            return attn.heads(*qkv.split(self.qkv_sizes, dim=-1), cos, sin, mask, cache, cache_start)
        qk = apply_rope(qkv[..., :(nh + n_kv) * hd].view(B, T, nh + n_kv, hd), cos, sin)  # (B, T, nh + n_kv, hd)
        q, k = qk.split([nh, n_kv], dim=2)
        return attn.attend(q, k, qkv[..., (nh + n_kv) * hd:].view(B, T, n_kv, hd), mask, cache, cache_start)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_start=0):
        o, down = lora.base_linear(self.self_attn.o_proj), lora.base_linear(self.mlp.down_proj)
        y = self.heads(x, cos, sin, mask, cache, cache_start)  # (B, T, nh*hd)
        x = decode_linear(y, o.weight, o.bias, residual=x)  # (B, T, H)
        gate_up = decode_linear(x, self.gate_up_weight, self.gate_up_bias, norm=self.post_attention_layernorm)
        return decode_linear(gate_up, down.weight, down.bias, swiglu=True, residual=x)  # (B, T, H)


class DecodeHead(nn.Module):
    """The lm_head for decoding, which `prepare_for_decoding` puts in its place: the same weight, through
    `decode_linear`."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight, self.bias = head.weight, head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def prepare_for_decoding(llm) -> None:
    """Merge the LoRA adapters into their base weights and put a `DecodeLayer` in each layer's place and a
    `DecodeHead` in the lm_head's. The model computes what it did (the merged model), in place."""
    lora.merge_lora(llm)
    layers = llm.model.layers
    for i, layer in enumerate(layers):
        layers[i] = DecodeLayer(layer)
    llm.lm_head = DecodeHead(lora.base_linear(llm.lm_head))


class Rows:
    """A layer's KVCache as the prompts' pass into some of a decoder's rows sees it (`GraphDecoder.admit`): the
    pass's keys and values (k, n_kv, T, hd) go to slots 0..T-1 of cache rows `rows` (a slice, or a (k,) tensor of
    rows), and attention takes them as they are."""

    def __init__(self, cache, rows: slice | torch.Tensor):
        self.cache, self.rows = cache, rows

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.cache.k[self.rows, :, :T] = k
        self.cache.v[self.rows, :, :T] = v
        return k, v


@dataclasses.dataclass
class Slots:
    """A decoder's rows on the device, at the fixed addresses that a recorded graph reads and writes."""
    caches: list  # one KVCache (R, n_kv, S, hd) a layer
    token: torch.Tensor  # (R, 1) each row's last token
    slot: torch.Tensor  # (R,) the cache slot its next token goes to, which is also that token's position
    out: torch.Tensor  # (R, steps) the tokens of the last call

    def head(self, n: int) -> "Slots":
        """Rows 0..n-1, as views of the same buffers (a decode call that runs only those rows)."""
        caches = [copy.copy(c) for c in self.caches]
        for part, c in zip(caches, self.caches):
            part.k, part.v = c.k[:n], c.v[:n]
        return Slots(caches, self.token[:n], self.slot[:n], self.out[:n])


class RowSettings:
    """What differs from row to row beside the cache when requests share a batch (serve.py): each row's run (the
    index `lora.BatchedLoRALinear` gathers its adapters by) and sampling (temperature, 0 for greedy; top-p; the seed
    of its draws and how many it has drawn), in buffers of `rows` entries at fixed addresses, which recorded steps
    read. `wanted[key]` holds a prompt's (run, temperature, top_p, seed) until the prompt takes a row (`place`).
    `rows(n)` are the n rows of the pass running, rows 0..n-1 in a decode step, those being filled in a prompts'
    pass (`of_rows`); `now(t, n)` is buffer t at those rows."""

    def __init__(self, rows: int, device):
        self.run = torch.zeros(rows, dtype=torch.long, device=device)
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.drawn = torch.zeros(rows, dtype=torch.long, device=device)
        self.wanted: dict = {}
        self.samplers: set[int] = set()  # rows placed with a temperature above 0 (until a greedy prompt takes one)
        self.at: slice | torch.Tensor | None = None

    @property
    def sampling(self) -> bool:
        """Whether any row samples; if none does, a step picks each row's argmax and nothing else."""
        return bool(self.samplers)

    def place(self, rows: list[int], keys: list) -> None:
        """The settings of the prompts `keys` (their `wanted`), written to the rows they take, draw counts at 0."""
        run, temperature, top_p, seed = zip(*[self.wanted.pop(k) for k in keys])
        at = torch.tensor(rows, device=self.run.device)
        for buffer, values in ((self.run, run), (self.temperature, temperature), (self.top_p, top_p),
                               (self.seed, seed), (self.drawn, [0] * len(rows))):
            buffer[at] = torch.tensor(values, dtype=buffer.dtype).to(buffer.device)
        self.samplers = (self.samplers - set(rows)) | {r for r, t in zip(rows, temperature) if t > 0}

    @contextlib.contextmanager
    def of_rows(self, at: slice | torch.Tensor):
        self.at = at
        try:
            yield
        finally:
            self.at = None

    def rows(self, n: int) -> slice | torch.Tensor:
        return slice(0, n) if self.at is None else self.at

    def now(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.rows(n)]


def hashed_uniform(seed: torch.Tensor, count: torch.Tensor, V: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), (n, V): each a hash of its row's seed, the row's draw count and the vocabulary
    index, a counter-based generator (as Philox is) in integer ops, so that a row's draws depend on its own seed
    and count only, never on the rows beside it."""
    def mix(x):  # a 32-bit integer hash of x in [0, 2^32); the multiplier is below 2^31, so products fit in int64
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x
    row = mix(mix(seed & 0xFFFFFFFF) ^ (count & 0xFFFFFFFF))  # (n,)
    x = mix(row[:, None] ^ torch.arange(V, device=seed.device))  # (n, V)
    return ((x >> 9).float() + 0.5) / (1 << 23)  # 23 bits: float32 keeps them exact, strictly inside (0, 1)


def sample_rows(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Each row's next token from logits (n, V) by its own settings (`rows`): the argmax where its temperature is
    0, else top-p sampling at its temperature, the Gumbel-max draw of `model.sample` with noise from its seed and
    draw count (`hashed_uniform`)."""
    greedy = logits.argmax(-1)
    if not rows.sampling:
        return greedy
    n = logits.shape[0]
    temperature, top_p = rows.now(rows.temperature, n), rows.now(rows.top_p, n)
    x = logits / temperature.clamp(min=1e-6)[:, None]  # (n, V)
    sorted_x, order = x.sort(-1, descending=True)
    p = sorted_x.softmax(-1)
    drop = p.cumsum(-1) - p > top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    u = hashed_uniform(rows.now(rows.seed, n), rows.now(rows.drawn, n), x.shape[1])
    rows.drawn[rows.rows(n)] += 1
    return torch.where(temperature > 0, (x - (-u.log()).log()).argmax(-1), greedy)


class Scheduler:
    """The books of `GraphDecoder.stream`'s rows, on the host (as a serving engine's scheduler keeps its waiting
    and running queues): the prompts `waiting` for a row, (key, ids, embeddings (T, H) or None), read from
    `batches` as rows free up; the `running` rows, row -> (key, its tokens so far); and the stop rule, a stop token
    or `max_new_tokens`. Rows that end are taken out and returned as (key, tokens without the stop token).
    `on_token` receives the tokens of the first admitted rows, their first ones and then each step's, at most
    `max_new_tokens` times."""

    def __init__(self, batches: Iterator[list[tuple]], max_new_tokens: int, stop_ids=(), on_token=None):
        self.batches, self.max_new_tokens, self.stops = batches, max_new_tokens, set(stop_ids)
        self.waiting: collections.deque = collections.deque()
        self.running: dict[int, tuple] = {}
        self.exhausted = False  # `batches` has ended
        self.on_token, self.streamed, self.shown = on_token, [], 0  # the rows on_token sees, its calls so far

    def fill(self, want: int) -> None:
        """The next batches, until `want` prompts wait, the batches end or none waits now (a batch of [])."""
        while not self.exhausted and len(self.waiting) < want:
            got = next(self.batches, None)
            self.exhausted = got is None
            if not got:
                break
            self.waiting.extend(got)

    def should_admit(self, R: int) -> bool:
        """Whether the waiting prompts' pass runs now: some wait, and no row runs or a quarter of the R rows is
        free."""
        return bool(self.waiting) and (not self.running or 4 * (R - len(self.running)) >= R)

    def take(self, R: int, room: int, width) -> tuple[list[int], list[tuple]]:
        """The free rows of the R rows and the waiting prompts that take them, in order, while a prompt's padded
        width (`width(its tokens)`) is at most `room`, the cache slots a row has for it."""
        free = [r for r in range(R) if r not in self.running]
        take = []
        while self.waiting and len(take) < len(free) and width(len(self.waiting[0][1])) <= room:
            take.append(self.waiting.popleft())
        return free[:len(take)], take

    def start(self, rows: list[int], items: list[tuple], firsts: list[int]) -> list[tuple]:
        """Rows `rows` running the prompts `items` from their first tokens `firsts`: those that end at once."""
        if not self.streamed:
            self.streamed = rows
            self.show(firsts)
        finished = []
        for r, (key, _, _), t in zip(rows, items, firsts):
            tokens = []
            if self.extend(tokens, [t]):
                finished.append((key, tokens))
            else:
                self.running[r] = (key, tokens)
        return finished

    def busy(self) -> int:
        """The rows a decode call must run: 1 + the highest row that runs (or that `on_token` streams)."""
        rows = [*self.running, *(self.streamed if self.on_token is not None else ())]
        return max(rows, default=0) + 1

    def step(self, new: list[list[int]]) -> list[tuple]:
        """A call's tokens, new (n, steps) for rows 0..n-1, added to the running rows (all below n): the rows that
        end, taken out."""
        if self.on_token is not None:
            for j in range(len(new[0])):
                self.show([new[r][j] for r in self.streamed])
        finished = []
        for r in list(self.running):
            _, tokens = self.running[r]
            if self.extend(tokens, new[r]):
                finished.append(self.running.pop(r))
        return finished

    def extend(self, tokens: list[int], new: list[int]) -> bool:
        """`new` added to a row's `tokens` up to a stop token or `max_new_tokens`: whether the row ends."""
        for t in new:
            if t in self.stops or len(tokens) >= self.max_new_tokens:
                return True
            tokens.append(t)
        return len(tokens) >= self.max_new_tokens

    def end(self, progress) -> list[tuple]:
        """The running rows whose keys `progress({key: tokens so far})` returns, taken out."""
        gone = progress({key: tokens for key, tokens in self.running.values()})
        return [self.running.pop(r) for r in [r for r, (key, _) in self.running.items() if key in gone]]

    def show(self, tokens: list[int]) -> None:
        """One step's tokens of the streamed rows, to `on_token` (its first `max_new_tokens` calls)."""
        if self.on_token is not None and self.shown < self.max_new_tokens:
            self.on_token(tokens)
            self.shown += 1


class GraphDecoder:
    """Decoding with fixed shapes, `steps` decode steps recorded as one CUDA graph, and continuous batching
    (`stream`): a finished row takes the next prompt. The eager step launches a few hundred small kernels per
    token, so at small batches the host sets the pace; replayed, the recorded steps cost the host one launch and
    one read of the tokens per `steps` tokens (gpt-fast records one step with torch.compile's "reduce-overhead";
    several per graph leave the host less to do). Each row has its own cache slot for its next token (its prompt
    fills the slots from 0 on, so the slot is also the token's position), and the caches, slots and tokens are
    buffers the decoder owns, one set per (rows, cache length), so that a recorded graph always finds them at the
    same address. Sampling is recorded too: it draws from the default CUDA generator, so seed that
    (torch.manual_seed) rather than passing a generator.

    Use: `llm.generate(prompts, n, decoder=GraphDecoder(llm))` for one batch, `stream` for a dataset. Making one
    prepares the model for decoding (LoRA merged, each layer a `DecodeLayer`: `prepare_for_decoding`).
    `compile=False` records the eager step as it is (vLLM's and gpt-fast's CUDA graphs without the compiler): a
    recording is a run of the steps, well under a second, so there is no compile wait, and the prompt's pass runs
    eager too; `generate.py --predict` decodes so by default on a GPU. With `compile`, the steps are Inductor's and,
    at batch 1, `decode_linear`'s (torch.compile, once per shape). `record=False` runs the same steps eagerly,
    neither compiled nor recorded (what the CPU tests check). All recorded graphs share one memory pool: they are
    replayed one at a time. `prepare=False` records the model as it is, its adapters unmerged (training's
    evaluation: the weights keep their addresses while AdamW updates them in place, and a new decoder is made for
    each evaluation)."""

    def __init__(self, llm, steps: int = 8, bucket: int = 256, record: bool = True, compile: bool = True,
                 prepare: bool = True):
        if llm.config.sliding_window is not None:
            raise ValueError("the recorded decoder does not support a sliding-window model")
        if prepare:
            prepare_for_decoding(llm)
        self.llm, self.steps, self.bucket, self.record = llm, steps, bucket, record
        self.compiled = compiled = record and compile
        if compiled:
            load_kernels()
        self.step = torch.compile(static_decode, fullgraph=True) if compiled else static_decode
        # the prompt's pass: compiled for any length (dynamic shapes), not recorded
        self.prefill = torch.compile(llm.prefill, dynamic=True) if compiled else llm.prefill
        self.states: dict = {}  # (R, S) -> Slots
        self.graphs: dict = {}  # (R, S, rows run, sampling settings) -> graph
        self.pool = None  # the graphs' memory pool
        self.settings = None  # the RowSettings of the running stream, if any

    def batch_rows(self, B: int) -> int:
        """The rows that a batch of B prompts runs in, recorded: B rounded up to a multiple of 64 (one prompt runs
        alone), so that batches share their graphs (and the attention kernels that cuDNN builds for each shape).
        The extra rows idle, and take their share of each sampling step's random draws."""
        return B if B == 1 or not self.record else -(-B // 64) * 64

    def prompt_width(self, P: int) -> int:
        """The width that prompts of up to P tokens are padded to: P rounded up to a quarter of the power of two
        below it (16 at least), so that the prompts' pass sees a few shapes (at most 25% wider)."""
        m = max(16, (1 << (P.bit_length() - 1)) // 4)
        return -(-P // m) * m

    def slots(self, R: int, S: int) -> Slots:
        if (R, S) not in self.states:
            w = self.llm.model.embed_tokens.weight
            zeros = functools.partial(torch.zeros, dtype=torch.long, device=w.device)
            self.states[R, S] = Slots(self.llm.setup_caches(R, S, w.device, w.dtype), zeros(R, 1), zeros(R),
                                      zeros(R, self.steps))
        return self.states[R, S]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, pick, stop_ids=(),
                 prompt_embeds: list | None = None, on_token=None) -> list[list[int]]:
        """`LLM.generate`'s decoding, for one batch: its prompts take rows together (`batch_rows`), in a cache
        whose length is rounded up to `bucket`, so that calls of similar lengths share their graphs."""
        embeds = prompt_embeds or [None] * len(prompts)
        done: dict = {}
        for finished in self.stream(iter([list(zip(range(len(prompts)), prompts, embeds))]), max_new_tokens, pick,
                                    stop_ids, self.batch_rows(len(prompts)), bucket=self.bucket, on_token=on_token):
            done.update(finished)
        return [done[b] for b in range(len(prompts))]

    def stream(self, batches: Iterator[list[tuple]], max_new_tokens: int, pick, stop_ids=(), rows: int = 256,
               slots: int | None = None, bucket: int = 64, on_token=None, prompt_tokens: int | None = None,
               progress=None, settings: RowSettings | None = None) -> Iterator[list[tuple]]:
        """Continuous batching: the prompts of `batches` (lists of (key, ids, embeddings (T, H) or None), longest
        first, as data.length_batches sends them) take the free rows of `rows` rows (at most `slots` cache slots
        in all); yields lists of (key, new tokens without the stop token) as rows finish (`Scheduler` keeps the
        rows' books). After each call of `steps` decode steps the host reads the tokens, frees the finished rows,
        and, once a quarter of the rows is free (or none runs), runs the next prompts' pass into the free rows'
        caches (`admit`). The cache has room for the first prompts' width and `max_new_tokens`, rounded up to
        `bucket`; a longer prompt waits until every row has finished, then gets a cache of its own. `on_token`
        receives each step's new tokens of the first prompts' rows, in order (streaming one batch).

        Requests that arrive at any time (serve.py): `batches` yields [] while none waits, and the stream returns
        once no row runs and none waits; `prompt_tokens` sizes the cache for the longest prompt that may come;
        `progress({key: tokens so far})` sees the running rows after each admission and each call, and returns the
        keys to end now (a client gone, a stop string, a request's own token limit), which finish there; `settings`
        holds each row's own sampling and run, written as a prompt takes its row (`RowSettings.place`)."""
        if self.record and pick.keywords.get("generator") is not None:
            raise ValueError("a recorded decoder samples with the default CUDA generator: seed it with "
                             "torch.manual_seed and pass no generator")
        scheduler = Scheduler(batches, max_new_tokens, stop_ids, on_token)
        room = self.room(max_new_tokens)
        state, R, S = None, rows, 0
        self.settings = settings
        while True:
            scheduler.fill(R - len(scheduler.running))
            if not scheduler.waiting and not scheduler.running:
                return
            finished = []
            if scheduler.should_admit(R):
                if state is None:  # a cache with room for the next rows' longest prompt
                    longest = prompt_tokens or max(len(ids) for _, ids, _ in itertools.islice(scheduler.waiting, rows))
                    R, S = self.cache_shape(longest, room, bucket, rows, slots)
                    state = self.slots(R, S)
                at, take = scheduler.take(R, S - room, self.prompt_width)
                if not take and not scheduler.running:  # the next prompt is longer than this cache has room for
                    self.drop(R, S)
                    state = None
                    continue
                if take:
                    if settings is not None:
                        settings.place(at, [key for key, _, _ in take])
                    finished += scheduler.start(at, take, self.admit(state, at, take, pick))
                if progress is not None:
                    finished += scheduler.end(progress)
            if scheduler.running:
                n = self.live_rows(R, scheduler.busy())
                self.advance(state, pick, n)
                # the next prompts' media pass (the aligner), queued behind these steps while they run: the host
                # launches it instead of waiting for the tokens
                scheduler.fill(R)
                finished += scheduler.step(state.out[:n].tolist())  # (n, steps)
                if progress is not None:
                    finished += scheduler.end(progress)
            if finished:
                yield finished

    def room(self, max_new_tokens: int) -> int:
        """The decode steps' cache slots that a row may take: `max_new_tokens` - 1, rounded up to whole calls."""
        return -(-(max_new_tokens - 1) // self.steps) * self.steps

    def record_for_serving(self, rows: int, slots: int | None, prompt_tokens: int, max_new_tokens: int, pick,
                           settings: RowSettings, bucket: int = 64) -> None:
        """Before a server's first request: its decode calls recorded for every row count that `live_rows` gives,
        on the cache that `stream` makes for prompts of up to `prompt_tokens` tokens, as greedy rows run them and
        (with `settings`) as rows that sample do, so that no request waits for a recording (vLLM captures its
        batch sizes at start-up)."""
        if not self.record:
            return
        R, S = self.cache_shape(prompt_tokens, self.room(max_new_tokens), bucket, rows, slots)
        state, self.settings = self.slots(R, S), settings
        for samplers in ([set(), {0}] if settings is not None else [None]):
            if settings is not None:  # the graph of sampling rows: any row placed with a temperature records it
                settings.samplers = samplers
            for n in sorted({self.live_rows(R, busy) for busy in range(1, R + 1)}):
                self.graph(state, pick, n)
        if settings is not None:
            settings.samplers = set()

    def cache_shape(self, longest: int, room: int, bucket: int, rows: int, slots: int | None) -> tuple[int, int]:
        """(R, S): S cache slots a row, room for a prompt of `longest` tokens (its `prompt_width`) and `room` decode
        slots, rounded up to `bucket`; R of `rows` rows, as many as `slots` cache slots hold in all (one at least)."""
        S = -(-(self.prompt_width(longest) + room) // bucket) * bucket
        return (rows if slots is None else max(1, min(rows, slots // S))), S

    def admit(self, state: Slots, rows: list[int], items: list[tuple], pick, budget: int = 1 << 16) -> list[int]:
        """The prompts' pass of `items` (key, ids, embeddings or None) into cache rows `rows`, in parts of at most
        `budget` padded tokens: each row's keys and values at slots 0.., its first token and its next slot set.
        Returns the first tokens."""
        device, firsts, s = state.slot.device, [], 0
        while s < len(items):
            e = s + 1
            while e < len(items) and (e + 1 - s) * self.prompt_width(max(len(x[1]) for x in items[s:e + 1])) <= budget:
                e += 1
            prompts = [ids for _, ids, _ in items[s:e]]
            x, lengths = self.llm.embed_prompts(prompts, [emb for *_, emb in items[s:e]],
                                                self.prompt_width(max(map(len, prompts))))  # (k, W, H), (k,)
            # rows side by side (every row of a wave that starts together) as a slice: a plain copy, not a scatter
            contiguous = rows[s:e] == list(range(rows[s], rows[s] + e - s))
            at = slice(rows[s], rows[s] + e - s) if contiguous else torch.tensor(rows[s:e], device=device)
            for c in state.caches:  # what a row's last request left there (the mask hides it, but a NaN or Inf
                c.k[at], c.v[at] = 0, 0  # times the mask's zero weight is NaN) is gone
            with prebuilt_attention(), self.rows_of(at):
                first = pick(self.prefill(x, (lengths - 1).to(device), [Rows(c, at) for c in state.caches]))  # (k,)
            state.token[at, 0] = first
            state.slot[at] = lengths.to(device)
            firsts.append(first)
            s = e
        return torch.cat(firsts).tolist()

    def live_rows(self, R: int, busy: int) -> int:
        """The rows 0..n-1 that a decode call runs when rows 0..busy-1 hold every running one (free rows are taken
        lowest first, so the running ones gather there): n is `busy` rounded up to a power of two, at most R, so
        that a few requests pay for a few rows and the calls share at most log2(R) + 1 recorded graphs (vLLM's
        padded batch sizes). A compiled step keeps all R rows, one shape for the compiler."""
        return R if self.compiled else min(R, 1 << (busy - 1).bit_length())

    def advance(self, state: Slots, pick, n: int) -> None:
        """The next `steps` tokens of rows 0..n-1, to `state.out`: the recorded steps' replay (recorded at the first
        call of their shape), or the steps run as they are."""
        if not self.record:
            self.run(state.head(n) if n < len(state.token) else state, pick)
            return
        self.graph(state, pick, n).replay()

    def graph(self, state: Slots, pick, n: int) -> torch.cuda.CUDAGraph:
        """The recorded call of rows 0..n-1 of `state` with `pick`, recorded at its first use."""
        R, S = state.caches[0].k.shape[::2]
        sampled = self.settings is not None and self.settings.sampling  # per-row settings: does any row sample?
        key = (R, S, n, tuple(pick.keywords.items()), sampled)
        if key not in self.graphs:
            self.graphs[key] = self.capture(state.head(n) if n < R else state, pick)
        return self.graphs[key]

    def run(self, state: Slots, pick) -> None:
        """The steps as recorded: each row's next tokens from its last, to state.out (R, steps); the slots move on
        (an idle row's stay within the cache), and state.token ends at each row's last token."""
        S, token = state.caches[0].k.shape[2], state.token
        for j in range(self.steps):
            token = pick(self.step(self.llm, token, state.caches, state.slot))[:, None]  # (R, 1)
            state.out[:, j:j + 1] = token
            state.slot.add_(1).clamp_(max=S - 1)
        state.token.copy_(token)

    def capture(self, state: Slots, pick) -> torch.cuda.CUDAGraph:
        # what the warm-up steps move on, put back before each run: tokens, slots (and per-row draw counts)
        moved = [state.token, state.slot] + ([self.settings.drawn] if self.settings is not None else [])
        saved = [t.clone() for t in moved]
        side = torch.cuda.Stream()  # compile and warm up off the main stream, as recording wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # one warm-up run of the eager steps (two of compiled ones, whose second call may compile again);
            # these steps write the cache slots that the replay then writes again
            for _ in range(2 if self.compiled else 1):
                for t, s in zip(moved, saved):
                    t.copy_(s)
                self.run(state, pick)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(moved, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run(state, pick)
        self.pool = graph.pool()
        return graph

    def rows_of(self, at: slice | torch.Tensor):
        """The context of a prompts' pass into rows `at`: there, per-row settings are those rows' (`RowSettings`)."""
        return self.settings.of_rows(at) if self.settings is not None else contextlib.nullcontext()

    def drop(self, R: int, S: int) -> None:
        """Free the rows of shape (R, S) and their graphs."""
        self.states.pop((R, S), None)
        for key in [k for k in self.graphs if k[:2] == (R, S)]:
            del self.graphs[key]


def choose_decoder(llm, eager: bool = False, compile: bool = False, merge: bool = True,
                   serving: bool = False) -> GraphDecoder | None:
    """The decoder that generation runs on `llm` (the `decoder` of `LLM.generate` and `answer_batches`), for every
    entry point: on a GPU, the decode steps recorded as CUDA graphs (`GraphDecoder`), compiled first with
    `compile`; with `eager`, on a CPU or for a sliding-window model (which the recorded decoder does not support:
    a ValueError with `compile`), None, `LLM.generate`'s own steps. A server (`serving`) feeds its requests to
    `GraphDecoder.stream`, so it gets a GraphDecoder everywhere (a sliding-window model: a ValueError), whose steps
    run unrecorded off the GPU. With `merge` the LoRA adapters are merged into the base weights
    (`prepare_for_decoding`); a 4-bit base (QLoRA) cannot take them, so its decoder runs the model as it is,
    uncompiled."""
    cuda, window = llm.lm_head.weight.is_cuda, llm.config.sliding_window is not None
    if window and (compile or serving):
        raise ValueError("the recorded decoder does not support a sliding-window model; "
                         + ("leave --compile out" if compile else "serve.py cannot serve one"))
    if not serving and (eager or not cuda or window):
        return None
    nf4 = any(isinstance(m, NF4Linear) for m in llm.modules())
    return GraphDecoder(llm, record=cuda, compile=compile and not nf4, prepare=merge and not nf4)

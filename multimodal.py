"""The multimodal model: projectors from aligned features into the LLM's input space, the typed `Batch` it
reads, the loss at labelled positions (lm_head in chunks, no full logits tensor) and `MultimodalLM`, which
writes projected media features into their placeholder positions before the LLM's layers.

    model = MultimodalLM(llm, aligner, projectors, media_ids)
    out = model(batch)                                 # LossOutput: summed loss and labelled tokens
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from encoders import Aligner
from model import LLM, prebuilt_attention, sample

MODALITIES = ("image", "audio")  # the media a sample can hold, in the order of Batch.modality's columns

if TYPE_CHECKING:  # flex attention imports the compiler stack: loaded where a BlockMask is made
    from torch.nn.attention.flex_attention import BlockMask


# ----------------------------------------------------------------------------------------------------------------
# Projectors: aligned features (B, N, D) -> K tokens of the LLM's input space (B, K, H)


class Projector(nn.Module):
    """Linear-GELU-Linear per token (LLaVA-1.5). `mode="pool"` pools the N encoder tokens to K (adaptive average);
    `mode="pooled"` projects the pooled embedding once and repeats it K times."""

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

    def pad_static(self, multiple: int, copies: int = 1) -> "Batch":
        """The same batch in few shapes, for a training step recorded as a CUDA graph (padded rows only).

        `label_index` is padded to a multiple of the row length at weight 0 (the padding adds nothing to the loss,
        the token counts or the gradients), and each modality's media to a multiple of the number of rows, with
        their features written to a scratch position: the batch's last one, a pad token that no real token attends
        to (rows are widened by `multiple` columns if none is left). `copies`: the rows that share each medium (its
        slots are that many copies, as `Media.slots` says), each copy padded alike. Only shapes and `lengths` are
        read, so a batch already on the GPU is padded without waiting for it; a batch with nothing to pad is
        returned as it is."""
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
                slots = x.slots.view(copies, -1)  # (c, N*K)
                slots = torch.cat([slots, slots.new_full((copies, extra * slots.shape[1] // len(x)), scratch)], 1)
                slots = slots.flatten()
                media[m] = Media(slots, grow(x.raw), grow(x.tokens), grow(x.pooled))
        return replace(b, media=media)


# ----------------------------------------------------------------------------------------------------------------
# MultimodalLM: frozen aligner -> projectors -> LLM with LoRA, loss only at labelled positions


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
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

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
                 loss_chunk: int = 512, chunk_loss: Callable = cross_entropy_chunk,
                 training_mask: Callable = document_mask):
        super().__init__()
        self.llm, self.aligner, self.projectors = llm, aligner, projectors
        self.media_token_ids = media_token_ids
        self.loss_chunk = loss_chunk
        self.chunk_loss = chunk_loss  # one chunk of the loss (`cross_entropy_chunk`, or a compiled version of it)
        # packed rows' mask in train mode: the dense `document_mask`, or flex attention's `document_block_mask` for
        # compiled layers (build.py); eval mode, whose layers run eager, takes the dense one
        self.training_mask = training_mask

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
        if batch.doc_ids is None:
            return None
        return (self.training_mask if self.training else document_mask)(batch.doc_ids)

    def forward(self, batch: Batch) -> LossOutput:
        # position t predicts token t+1; labels were shifted when the sample was encoded (data.encode_conversation):
        # labels[t] is the target at t.
        labels = batch.labels.flatten()  # (B*T,)
        where = batch.label_index  # (M,) flat positions with a label, found by the collator
        x = self.embed(batch)  # (B, T, H)
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

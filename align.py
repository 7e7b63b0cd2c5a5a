"""Phase 1 of mmlora: align image and audio (and text) into one embedding space, the aligner that Phase 2 freezes.

    python train.py --config configs/demo-align.toml      # train.phase = "align": writes <out_dir>/aligner/

The idea is ImageBind's (Girdhar et al., 2023, arXiv 2305.05665): each pair of modalities is pulled together by a
symmetric InfoNCE loss with a learned temperature, as in CLIP (Radford et al., 2021, arXiv 2103.00020), and
modalities never paired directly become aligned through the ones they share. Pairs are image-text, audio-text and
image-audio. Text is embedded by the frozen LLM of Phase 2 (the mean of its last hidden states over the text's
tokens) through a trainable head, so no text model of another family is needed and the aligned space is learned
against the very model that will read it. The aligner's heads are trained, and with `train.align_encoders` our own
small encoders too; Hugging Face towers stay frozen.

train.py runs this model in its one loop (torchrun DDP, AMP, checkpoints, resume, metrics); under torchrun
build.py gives it a `gather` over the ranks, so that each pair's negatives are the pairs of its kind on every rank.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import PAIR_KINDS, PairBatch
from weights import save_tensors, write_json
from model import LLM
from encoders import Aligner, save_aligner
from multimodal import MODALITIES, LossOutput


def gather_one(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The gather of a single process: the rows of all ranks are this rank's, starting at row 0."""
    return x, 0


class AlignModel(nn.Module):
    """The aligner's towers, a text tower on the frozen LLM, and the temperature: `forward(PairBatch)` embeds both
    sides of each pair and returns the contrastive loss as a `LossOutput` (summed over the batch's pairs).
    `gather(x)` gives the rows of x (B, ...) of all ranks and where this rank's start (`contrastive_loss`)."""

    def __init__(self, aligner: Aligner, llm: LLM, train_encoders: bool = False, gather=gather_one):
        super().__init__()
        self.aligner, self.llm = aligner, llm
        self.llm.requires_grad_(False)
        self.aligner.requires_grad_(False)
        for m in MODALITIES:
            tower = getattr(aligner, m)
            tower.head.requires_grad_(True)
            if train_encoders and not getattr(aligner.config, m).hf:
                tower.encoder.requires_grad_(True)
        self.text_head = nn.Linear(llm.config.hidden_size, aligner.config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature, 0.07
        self.gather = gather

    def towers(self) -> dict[str, nn.Module]:
        """Each side's trainable part: the image and audio towers and the text head."""
        return {"image": self.aligner.image, "audio": self.aligner.audio, "text": self.text_head}

    def embed_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Texts (N, L) right-padded -> unit embeddings (N, D): the frozen LLM's last hidden states, averaged over
        each text's tokens (causal attention: no token sees the padding after it), through the text head."""
        with torch.no_grad():
            h = self.llm.hidden_states(self.llm.model.embed_tokens(ids))  # (N, L, H)
            real = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).to(h.dtype)  # (N, L)
            mean = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (N, H)
        return F.normalize(self.text_head(mean.to(self.text_head.weight.dtype)), dim=-1)

    def embed(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings of each pair's two sides: (left (B, D), right (B, D))."""
        stack = [getattr(self.aligner, m)(batch.media[m])[1] for m in MODALITIES if m in batch.media]  # pooled
        if batch.text_ids is not None:
            stack.append(self.embed_text(batch.text_ids, batch.text_lengths))
        rows = torch.cat([x.float() for x in stack])  # (Ni + Na + Nt, D): [images; clips; texts]
        return rows[batch.left], rows[batch.right]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)  # CLIP's bound on the inverse temperature

    def forward(self, batch: PairBatch) -> LossOutput:
        left, right = self.embed(batch)
        losses = contrastive_loss(left, right, batch.kind, self.scale(), self.gather)  # (B,)
        ones = torch.ones_like(losses)
        return LossOutput(losses.sum(), ones.sum(), losses.detach(), ones)


def contrastive_loss(left: torch.Tensor, right: torch.Tensor, kind: torch.Tensor, scale: torch.Tensor,
                     gather=gather_one) -> torch.Tensor:
    """Symmetric InfoNCE of each pair (B,): the mean of the cross-entropy of finding its right side among all right
    sides of its kind, and its left side among all left sides of its kind, with logits `scale` * cosine.

    `gather` gives the sides of every rank's pairs (this rank's rows keep their gradient), so that the negatives
    come from the global batch and 1 rank and N ranks compute the same loss; pairs of other kinds are not
    negatives (an image-text pair is not compared with the texts of audio-text pairs)."""
    all_left, start = gather(left)  # (G, D)
    all_right, _ = gather(right)
    all_kind, _ = gather(kind)
    same = kind[:, None] == all_kind[None]  # (B, G)
    target = start + torch.arange(left.shape[0], device=left.device)  # (B,): each pair's own column
    to_right = (scale * left @ all_right.T).masked_fill(~same, float("-inf"))  # (B, G)
    to_left = (scale * right @ all_left.T).masked_fill(~same, float("-inf"))
    return (F.cross_entropy(to_right, target, reduction="none")
            + F.cross_entropy(to_left, target, reduction="none")) / 2


def recall_at_k(sim: torch.Tensor, match: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Retrieval recall: the fraction of queries (rows of `sim`, (Q, C) similarities to C candidates) whose k most
    similar candidates hold one that `match` (Q, C) bool marks as right."""
    order = sim.argsort(dim=1, descending=True)  # (Q, C)
    hit = match.gather(1, order)  # (Q, C): whether the candidate at each rank is right
    return {k: hit[:, :k].any(1).float().mean().item() for k in ks}


def retrieval_metrics(left: torch.Tensor, right: torch.Tensor, kind: torch.Tensor, keys: list[tuple[str, str]],
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k in both directions of each kind present, over all pairs (left, right (N, D), kind (N,)): e.g.
    "r1_image_text" (image -> text) and "r1_text_image". A candidate is right if its pair shares either side with
    the query's pair (`keys`: the text, or the medium's path), so that two images captioned alike both count."""
    out = {}
    for k, (a, b) in enumerate(PAIR_KINDS):
        idx = (kind == k).nonzero()[:, 0]
        if len(idx) == 0:
            continue
        ka, kb = (key_ids([keys[i][side] for i in idx.tolist()]) for side in (0, 1))  # (n,) each
        match = (ka[:, None] == ka[None]) | (kb[:, None] == kb[None])  # (n, n)
        sim = left[idx] @ right[idx].T  # (n, n)
        for name, s in ((f"{a}_{b}", sim), (f"{b}_{a}", sim.T)):
            for kk, r in recall_at_k(s, match, ks).items():
                out[f"r{kk}_{name}"] = r
    return out


def key_ids(keys: list[str]) -> torch.Tensor:
    """Equal keys -> equal integers. (N,) int64."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(k, len(seen)) for k in keys])


def save_result(model: AlignModel, folder: Path, llm: str) -> None:
    """Phase 1's result in `folder`: the aligner that Phase 2 takes as `model.aligner` (aligner.json,
    aligner.safetensors), and beside it the text tower (text_head.safetensors: the head and the temperature;
    text.json: the LLM whose hidden states it reads), for text-to-media retrieval."""
    save_aligner(model.aligner, folder)
    save_tensors({"weight": model.text_head.weight.detach(), "bias": model.text_head.bias.detach(),
                  "logit_scale": model.logit_scale.detach()}, folder / "text_head.safetensors")
    write_json(folder / "text.json", {"llm": str(Path(llm).resolve()),
                                      "embedding": "mean of the LLM's last hidden states over the text's tokens, "
                                                   "then text_head, normalised"})

"""Preference tuning (train.objective = "dpo"): the DPO and IPO losses, the optional SFT term on the chosen answers
(RPO), and their metrics under TRL's names, for train.py's loop.

    policy, reference, tokens = logps(model, raw_model, batch)      # (2S,) each: chosen rows, then rejected rows
    dpo_sum, nll_sum, stats = pair_terms(policy, reference, tokens, batch.groups(), cfg.train)
    row = metrics(stats, cfg.train)                                  # rewards/chosen, rewards/accuracies, ...

The reference model comes for free: it is the same model with the adapters this run trains turned off
(`lora.disable_adapters`), under no_grad, so the start (train.init_from: its LoRA merged into the base, or kept as
a frozen adapter, and its frozen projectors) is held once. Chosen and rejected answers are rows of one batch
(`preference.PreferenceBatch`), and the aligner runs once per sample for both passes. With pi the policy and ref the
reference, each answer's log-ratio is log pi(y|x) - log ref(y|x), summed over its tokens, and with
delta = chosen log-ratio - rejected log-ratio:
    sigmoid (DPO, arXiv 2305.18290)   -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta)   (e: cDPO's
                                      label smoothing, the chance that a pair's preference is flipped)
    ipo (IPO, arXiv 2310.12036)       (delta' - 1 / (2 beta))^2, delta' from log-ratios averaged over each answer's
                                      tokens, as TRL normalises it
    + rpo_alpha * NLL of the chosen answers per token (RPO, arXiv 2404.19733; TRL's "sft" loss term)
The rewards are beta times the log-ratios. The loss of a step is averaged over the pairs of the whole step on all
ranks (the SFT term over its chosen tokens), so that accumulation and data parallelism give one gradient.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import lora
from preference import PreferenceBatch
from config import TrainConfig
from distributed import World, all_sum, gradient_sync
from multimodal import Media, MultimodalLM

# each pair's values, summed over the pairs of each group (all, then data's text / image / audio samples)
VALUES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")
GROUPS = ("text", "image", "audio")
STATS = (1 + len(GROUPS)) * (len(VALUES) + 1) + 2  # then the pairs of each group, the chosen NLL and tokens


def metric_names() -> list[str]:
    """The metrics' names beside the loss (and its loss_text, loss_image, loss_audio): TRL's (rewards/chosen, ...),
    then per group of samples (rewards/chosen_image, ...)."""
    return [*VALUES[1:], *(f"{v}_{g}" for g in GROUPS for v in VALUES[1:])]


def with_features(model: MultimodalLM, batch: data.Batch) -> data.Batch:
    """The batch with its raw media replaced by the frozen aligner's outputs (what the feature cache holds), so that
    the reference and the policy pass share one run of the aligner."""
    media = {}
    for m, x in batch.media.items():
        if x.raw is not None:
            with torch.no_grad():
                tokens, pooled = getattr(model.aligner, m)(x.raw)  # (N, n, D), (N, D)
            x = Media(x.slots, tokens=tokens, pooled=pooled)
        media[m] = x
    return replace(batch, media=media)


def logps(model: nn.Module, raw: MultimodalLM, batch: PreferenceBatch
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's answer: its log-probability summed over its tokens under the policy (with gradient, through
    `model`: DDP or FSDP's wrapper, or `raw` itself) and under the reference (the run's adapters off, no gradient),
    and its labelled tokens: (2S,) each, chosen rows then rejected rows."""
    rows = with_features(raw, batch.rows)
    training = raw.training
    raw.eval()  # no backward follows: the plain forward, without checkpointing or offloading its layers' inputs
    try:
        with torch.no_grad(), lora.disable_adapters(raw.llm):
            reference = -model(rows).sample_loss
    finally:
        raw.train(training)
    out = model(rows)
    return -out.sample_loss, reference, out.sample_tokens


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's loss (S,), differentiable; the chosen and the rejected answers' rewards (S,) each) from the
    rows' summed log-probabilities and token counts (2S,)."""
    S, beta = policy.shape[0] // 2, cfg.dpo_beta
    ratios = policy - reference  # (2S,) log pi(y|x) - log ref(y|x)
    chosen, rejected = ratios[:S], ratios[S:]
    if cfg.dpo_loss == "ipo":  # per token, as TRL normalises it
        delta = chosen / tokens[:S].clamp(min=1) - rejected / tokens[S:].clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        e = cfg.dpo_label_smoothing
        delta = chosen - rejected
        losses = -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, groups: torch.Tensor,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the pairs' summed loss, the chosen answers' summed NLL: both differentiable; the batch's stats (STATS,),
    detached: each value of VALUES summed over the pairs of each group, with the group's pairs, then the chosen
    answers' NLL and tokens). `groups` (3, S) bool: the pairs of each kind of sample."""
    S = policy.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = preference_losses(policy, reference, tokens, cfg)
    values = torch.stack([losses.detach(), chosen_rewards, rejected_rewards,
                          (chosen_rewards > rejected_rewards).float(), chosen_rewards - rejected_rewards,
                          policy[:S].detach(), policy[S:].detach(), torch.ones_like(losses)], 1)  # (S, 8)
    members = torch.cat([torch.ones_like(groups[:1]), groups]).float()  # (4, S): all, text, image, audio
    nll = -policy[:S].sum()
    stats = torch.cat([(members @ values).flatten(), torch.stack([nll.detach(), tokens[:S].sum()])])
    return losses.sum(), nll, stats


def metrics(stats: torch.Tensor, cfg: TrainConfig) -> dict:
    """A metrics row's part from summed `pair_terms` stats: the loss (with the SFT term) and each of VALUES as the
    mean over the pairs, overall under TRL's names and per group of samples (None where a group had no pair)."""
    sums = stats[:-2].view(1 + len(GROUPS), len(VALUES) + 1).tolist()
    row = {}
    for group, (*values, pairs) in zip(("", *GROUPS), sums):
        for name, v in zip(VALUES, values):
            key = name if not group else f"loss_{group}" if name == "loss" else f"{name}_{group}"
            row[key] = v / pairs if pairs else None
    nll, tokens = stats[-2:].tolist()
    if cfg.rpo_alpha and row["loss"] is not None:
        row["loss"] += cfg.rpo_alpha * nll / max(tokens, 1.0)
    return row


def forward_backward(model: nn.Module, micro: list[PreferenceBatch], scaler, autocast, world: World,
                     cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step over its micro-batches, as train.forward_backward gives them for SFT:
    (stats (STATS,), the pairs of the step on all ranks). Each micro-batch's summed loss is divided by the pairs of
    the whole step on all ranks (its SFT term by their chosen tokens), times the world size, since the gradients
    are averaged over the ranks."""
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    counts = all_sum(torch.stack([sum(b.count() for b in micro), sum(b.chosen_tokens() for b in micro)]), world)
    stats = torch.zeros(STATS, device=world.device)
    for i, b in enumerate(micro):
        with gradient_sync(model, i == len(micro) - 1), autocast():
            policy, reference, tokens = logps(model, raw, b)
            dpo_sum, nll, batch_stats = pair_terms(policy.float(), reference.float(), tokens, b.groups(), cfg)
            loss = dpo_sum / counts[0]
            if cfg.rpo_alpha:
                loss = loss + cfg.rpo_alpha * nll / counts[1]
            loss = loss * world.size
        scaler.scale(loss).backward()
        stats += batch_stats
    return stats, counts[0]

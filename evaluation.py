"""Evaluation during training: Phase 2's validation loss (all and per kind of sample) and the exact-match accuracy
of greedy answers (on a preference set, DPO's loss and rewards too), Phase 1's contrastive loss and recall@k, and the
log line's summary of either.

    row = evaluate(model, val_ds, cfg, world, tokenizer, autocast)        # {"loss", "loss_text", ..., "accuracy"}
    row = evaluate_align(model, pairs, cfg, world, tokenizer, autocast)   # {"loss", ..., "r1_image_text", ...}
    print(eval_summary(row))                                              # "accuracy 83.3% (5/6)"
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.distributed as dist

import align
import data
import dpo
from model import until_stop
from tokenizer import Tokenizer
from media import load_audio, load_image
from multimodal import LossOutput, MultimodalLM
from preference import PreferenceDataset, collate_preferences
from decode import choose_decoder
from config import Config
from distributed import GatherRows, World, all_sum, is_sharded
from metrics import group_losses, group_sums


def eager_layers(fn):
    """`fn` with compiled layers run eager: evaluation's shapes change from call to call. Where nothing imported
    the compiler, nothing was compiled, and importing this file leaves it out."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)
    return run


@eager_layers
@torch.no_grad()
def evaluate(model: MultimodalLM, ds: data.ConversationDataset, cfg: Config, world: World, tokenizer: Tokenizer,
             autocast) -> dict:
    """Validation loss (all and per kind of sample) and the exact-match accuracy of greedy answers, over all ranks:
    {"loss", "loss_text", "loss_image", "loss_audio", "accuracy", "correct", "answered"}; on a preference set the
    DPO loss and rewards (`dpo.metrics`), and the accuracy of the answers against the chosen ones. With trackers,
    rank 0's first answers as `prediction_sample`s ("samples")."""
    model.eval()
    row = validation_loss(model, ds, cfg, world, tokenizer, autocast)
    mine = list(range(world.rank, min(len(ds), cfg.train.gen_samples), world.size))
    answers = (sharded_answers if is_sharded(model) else batched_answers)(model, ds, mine, cfg, tokenizer, autocast,
                                                                         world)
    correct, samples = torch.zeros(2), []
    want = cfg.run.tracker_samples if cfg.run.trackers and world.master else 0
    for i, tokens, answer in answers:  # counted, and the first answers kept for the trackers
        match = score(tokens, answer, tokenizer)
        correct.add_(match)
        if len(samples) < want:
            samples.append(prediction_sample(ds, i, tokens, answer, bool(match[0]), tokenizer))
    correct = all_sum(correct.to(world.device), world)
    row["correct"], row["answered"] = int(correct[0]), int(correct[1])
    row["accuracy"] = row["correct"] / row["answered"] if row["answered"] else None
    if want:
        row["samples"] = samples
    model.train()
    return row


def validation_loss(model: MultimodalLM, ds: data.ConversationDataset, cfg: Config, world: World,
                    tokenizer: Tokenizer, autocast) -> dict:
    """The loss over the first train.eval_samples samples (all and per kind of sample), summed over all ranks; on
    a preference set the DPO loss and rewards of the pairs (dpo.py)."""
    # under FSDP every rank runs every forward, since the ranks gather each layer's weights together: each runs as
    # many batches as the rank with the most (a spare one on a sample whose result is dropped)
    sharded, preferences = is_sharded(model), isinstance(ds, PreferenceDataset)
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    mine = list(range(world.rank, n, world.size))
    sums = torch.zeros(dpo.STATS if preferences else 6, device=world.device)
    loss_sum = torch.zeros(2, device=world.device)
    for s in range(0, -(-n // world.size), cfg.train.batch_size):
        idx = mine[s:s + cfg.train.batch_size]
        if not idx and not sharded:
            break
        items = [ds[i] for i in idx or [0]]
        if preferences:
            batch = collate_preferences(items, tokenizer.pad_id, cfg.data.pad_multiple).to(world.device)
            with autocast():
                policy, reference, tokens = dpo.logps(model, model, batch)
            if idx:
                sums += dpo.pair_terms(policy.float(), reference.float(), tokens, batch.groups(), cfg.train)[2]
            continue
        batch = data.collate(items, tokenizer.pad_id, pad_multiple=cfg.data.pad_multiple)
        with autocast():
            out = model(batch.to(world.device))
        if idx:
            sums += group_sums(out, batch.groups().to(world.device))
            loss_sum += torch.stack([out.sample_loss.sum(), out.sample_tokens.sum()])
    all_sum(sums, world)
    all_sum(loss_sum, world)
    if preferences:
        return dpo.metrics(sums, cfg.train)
    return {"loss": (loss_sum[0] / loss_sum[1]).item(), **group_losses(sums, "instruct")}


def batched_answers(model: MultimodalLM, ds: data.ConversationDataset, mine: list[int], cfg: Config,
                    tokenizer: Tokenizer, autocast, world: World):
    """Greedy answers to the samples `mine`, as generate.py --predict makes them: batches of similar length, prompts
    made in workers, recorded decode steps and continuous batching on a GPU. Yields (sample, tokens, reference).
    The loader draws no number from the run's RNG: resuming after an evaluation draws the same masks."""
    prompts = data.prompt_batches(ds, mine, 256, 1 << 16, cfg.train.max_new_tokens, tokenizer.pad_id, world.device,
                                  cfg.data.num_workers)
    with autocast(cache_enabled=False):  # a recording keeps no cast weights between replays
        for answered in model.answer_batches(((list(zip(kept, answers)), batch)
                                              for kept, answers, _, batch in prompts if batch is not None),
                                             cfg.train.max_new_tokens, tokenizer.stop_ids, rows=256, slots=1 << 16,
                                             decoder=choose_decoder(model.llm, merge=False)):
            for (i, answer), o in answered:
                yield i, o, answer


def sharded_answers(model: MultimodalLM, ds: data.ConversationDataset, mine: list[int], cfg: Config,
                    tokenizer: Tokenizer, autocast, world: World):
    """`batched_answers` under FSDP, where every rank runs every decode step, since the ranks gather each layer's
    weights together: each runs as many batches as the rank with the most (a spare one where it has none left)
    and all max_new_tokens steps, the answers cut at their stop tokens after (`score`). Yields (sample, tokens,
    reference)."""
    model.unshard()  # generation calls the model's parts directly, past the hooks that gather their weights
    try:
        for s in range(0, -(-min(len(ds), cfg.train.gen_samples) // world.size), cfg.train.batch_size):
            pairs = [(i, *p) for i, p in ((i, ds.prompt(i)) for i in mine[s:s + cfg.train.batch_size])
                     if p is not None]
            spare = pairs or [(0, *next(p for p in map(ds.prompt, range(len(ds))) if p is not None))]
            batch = data.collate([p for _, p, _ in spare], tokenizer.pad_id).to(world.device)
            with autocast():
                outs = model.generate(batch, cfg.train.max_new_tokens, stop_ids=())
            for o, (i, _, answer) in zip(outs, pairs):
                yield i, o, answer
    finally:  # also when the caller stops early or an error leaves the loop
        model.reshard()


def score(tokens: list[int], answer: str, tokenizer: Tokenizer) -> torch.Tensor:
    """(1 if the answer, cut at its first stop token, is the reference under `normalize_answer`, else 0; 1)."""
    tokens = until_stop(tokens, tokenizer.stop_ids)
    return torch.tensor([float(data.normalize_answer(tokenizer.decode(tokens)) == data.normalize_answer(answer)), 1.0],
                        device=torch.device("cpu"))


def prediction_sample(ds: data.ConversationDataset, i: int, tokens: list[int], answer: str, correct: bool,
                      tokenizer: Tokenizer) -> dict:
    """One validation answer as the trackers show it: the question, the answer given, the reference, whether they
    match, and the sample's first image ((H, W, 3) uint8) and first audio clip ((waveform, sample rate, file))."""
    ex = ds.examples[i]
    last = max(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(ex.messages[:last]) if m["role"] == "user"), "")
    sample = {"id": ex.id, "question": question, "prediction": tokenizer.decode(until_stop(tokens, tokenizer.stop_ids)),
              "reference": answer, "correct": correct, "images": [], "audio": []}
    rate = ds.aligner_config.sample_rate
    with contextlib.suppress(Exception):  # a medium that no longer decodes is left out of the table
        sample["images"] = [load_image(p).permute(1, 2, 0).numpy() for p in ex.media["image"][:1]]
        sample["audio"] = [(load_audio(p, rate).numpy(), rate, p) for p in ex.media["audio"][:1]]
    return sample


@torch.no_grad()
def evaluate_align(model: align.AlignModel, ds: data.PairDataset, cfg: Config, world: World, tokenizer: Tokenizer,
                   autocast) -> dict:
    """Phase 1's validation, over all ranks: the contrastive loss with the whole validation set as one batch (all
    and per kind of pair), and recall@1 and @5 in both directions of each kind ("r1_image_text": image -> text)."""
    model.eval()
    n = len(ds) if cfg.train.eval_samples == 0 else min(len(ds), cfg.train.eval_samples)
    share = -(-n // world.size)  # pairs per rank, the last ones repeated to make the shares equal
    mine = [min(i, n - 1) for i in range(world.rank * share, (world.rank + 1) * share)]
    sides, keys = [], []
    for s in range(0, len(mine), cfg.train.batch_size):
        items = [ds[i] for i in mine[s:s + cfg.train.batch_size]]
        batch = data.collate_pairs(items, tokenizer.pad_id).to(world.device)
        with autocast():
            left, right = model.embed(batch)
        sides.append(torch.cat([left, right, batch.kind[:, None].float()], 1))  # (b, 2D + 1)
        keys += [it.keys for it in items]
    rows = torch.cat(sides)
    if world.size > 1:
        rows = GatherRows.apply(rows, world)
        all_keys = [None] * world.size
        dist.all_gather_object(all_keys, keys)
        keys = [k for part in all_keys for k in part]
    D = model.aligner.config.dim
    left, right, kind = rows[:n, :D], rows[:n, D:2 * D], rows[:n, 2 * D].long()
    losses = align.contrastive_loss(left, right, kind, model.scale())  # (n,)
    ones = torch.ones_like(losses)
    sums = group_sums(LossOutput(losses.sum(), ones.sum(), losses, ones), data.kind_groups(kind))
    model.train()
    return {"loss": losses.mean().item(), **group_losses(sums, "align"),
            **align.retrieval_metrics(left, right, kind, keys[:n])}


def eval_summary(row: dict) -> str:
    """The log line's part of an eval row: accuracy, or Phase 1's recall@1 in each direction."""
    if "accuracy" in row:
        rewards = row.get("rewards/accuracies")
        return "accuracy " + ("n/a" if row["accuracy"] is None else
                              f"{100 * row['accuracy']:.1f}% ({row['correct']}/{row['answered']})") + \
            ("" if rewards is None else f", reward accuracy {100 * rewards:.1f}%")
    recalls = [f"{k[3:].replace('_', '->')} {100 * v:.0f}%" for k, v in row.items() if k.startswith("r1_")]
    return "recall@1 " + ", ".join(recalls)

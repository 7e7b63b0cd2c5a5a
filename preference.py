"""Preference pairs (train.objective = "dpo", dpo.py): a prompt, a chosen and a rejected answer, in TRL's
conversational form, read and checked as data.py reads conversations, and collated as one Batch of chosen rows then
rejected rows.

    {"id", "image", "audio", "prompt": [{"role": "user", "content": "<image>\nWhat colour?"}],
     "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue."}]}

The prompt may also be a string (one user turn) or LLaVA `conversations` ending on a user turn; an answer may be a
string, a message or a list of assistant messages; without a prompt, chosen and rejected are whole conversations
that share one (TRL's implicit prompt).

    ds = PreferenceDataset("data/preference_train.jsonl", tokenizer, aligner_config, {"image": 16, "audio": 8}, 512)
    batch = collate_preferences([ds[0], ds[1]], pad_id=tokenizer.pad_id)   # rows: 2 chosen, then 2 rejected
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from multimodal import MODALITIES, Batch, Media
from data import (PLACEHOLDERS, ROLES, ConversationDataset, Example, Item, SampleError, collate, decode_or_skip,
                  encode_conversation, to_messages)


def answer_turns(value, what: str) -> list[dict]:
    """A preference sample's answer (a string, a message, or a list of assistant messages) -> [{"role", "content"}]."""
    turns = [{"role": "assistant", "content": value}] if isinstance(value, str) else \
        value if isinstance(value, list) else [value]
    out = []
    for t in turns:
        role = ROLES.get(t.get("role", t.get("from"))) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role != "assistant" or not isinstance(content, str):
            raise ValueError(f"'{what}' holds {'a ' + role + ' turn' if role else 'a malformed turn'}; an answer is a "
                             "string or assistant messages ({\"role\": \"assistant\", \"content\": \"...\"})")
        out.append({"role": "assistant", "content": content})
    if not any(t["content"].strip() for t in out):  # a blank answer: most likely a hole in the data
        raise ValueError(f"'{what}' is empty; an answer is a string or one or more assistant messages")
    return out


def preference_turns(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference record -> (prompt, chosen, rejected) as [{"role", "content"}] lists, checked: both answers
    given and different, one prompt for both, ending on a user turn, and media placeholders in the prompt only."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"no '{key}' answer; a preference sample holds a prompt, a 'chosen' and a 'rejected' "
                             "answer (TRL's preference form)")
    if "prompt" in record:
        value = record["prompt"]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else to_messages(
            {"conversations" if isinstance(value, list) and value and isinstance(value[0], dict)
             and "from" in value[0] else "messages": value})
    elif "conversations" in record or "messages" in record:
        prompt = to_messages(record)
    else:  # chosen and rejected are whole conversations: the prompt is what they share
        both = [to_messages({"messages": record[k]}) if isinstance(record[k], list) else answer_turns(record[k], k)
                for k in ("chosen", "rejected")]
        n = next((i for i, (a, b) in enumerate(zip(*both)) if a != b), min(map(len, both)))
        prompt, rest = both[0][:n], [b[n:] for b in both]
        if any(t["role"] != "assistant" for b in rest for t in b):
            raise ValueError("'chosen' and 'rejected' answer different prompts (they differ before their answers); "
                             "give both the same prompt, or the prompt on its own as 'prompt'")
        record = {**record, "chosen": rest[0], "rejected": rest[1]}
    if not prompt:
        raise ValueError("no prompt: give 'prompt' (messages ending on a user turn), or whole conversations as "
                         "'chosen' and 'rejected'")
    if prompt[-1]["role"] != "user":
        role = prompt[-1]["role"]
        raise ValueError(f"the prompt ends on {'an' if role == 'assistant' else 'a'} {role} turn; a preference prompt "
                         "ends on the user turn that 'chosen' and 'rejected' answer")
    chosen, rejected = answer_turns(record["chosen"], "chosen"), answer_turns(record["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same answer: the pair teaches nothing; drop it or give a "
                         "worse 'rejected'")
    found = {k: [p for p in PLACEHOLDERS.values() if any(p in t["content"] for t in turns)]
             for k, turns in (("chosen", chosen), ("rejected", rejected))}
    if found["chosen"] or found["rejected"]:
        where = "both answers" if found["chosen"] and found["rejected"] else \
            f"the {'chosen' if found['chosen'] else 'rejected'} answer only"
        raise ValueError(f"{' and '.join(sorted(set(found['chosen'] + found['rejected'])))} in {where}: media belong "
                         "to the prompt, which both answers share")
    return prompt, chosen, rejected


@dataclass
class PreferenceExample(Example):
    """A checked preference sample: `input_ids` / `labels` are the prompt with its chosen answer, labelled on the
    answer only; `messages` the prompt and the chosen answer (`prompt_turns` of them the prompt)."""
    rejected: list[dict] = field(default_factory=list)  # the rejected answer's turns
    rejected_ids: list[int] = field(default_factory=list)  # (T_r,) the prompt with the rejected answer
    rejected_labels: list[int] = field(default_factory=list)  # (T_r,) labelled on the rejected answer only
    prompt_turns: int = 0


@dataclass
class PreferenceItem:
    """One decoded preference sample: the chosen and the rejected row, which share the prompt's media (one copy)."""
    id: str
    chosen: Item
    rejected: Item
    skipped: list[dict] = field(default_factory=list)


class PreferenceDataset(ConversationDataset):
    """A preference file (TRL's conversational preference form, above), checked when built as ConversationDataset is:
    a bad sample stops with its file and line or is listed (`on_error`). The prompt and its media count once; each
    answer is labelled on its own turns only, and the prompt renders the same at the start of both rows."""

    def encode(self, line: int, record: dict, sid: str) -> PreferenceExample:
        try:
            prompt, chosen, rejected = preference_turns(record)
        except ValueError as e:
            raise SampleError(self.path, line, sid, str(e)) from None
        media = {m: record[m] for m in MODALITIES if m in record}
        ex = super().encode(line, {**media, "messages": prompt + chosen}, sid)  # media, lengths, the chosen labels
        try:
            K, cut = self.tokens_per_media, self.truncate
            prompt_ids, _, _ = encode_conversation(prompt, self.tok, K, self.max_len, cut, True, ex.blocks)
            rejected_ids, rejected_labels, _ = encode_conversation(prompt + rejected, self.tok, K, self.max_len, cut,
                                                                   blocks=ex.blocks)
        except ValueError as e:
            raise SampleError(self.path, line, sid, str(e)) from None
        P = len(prompt_ids)
        for name, ids, labels in (("chosen", ex.input_ids, ex.labels), ("rejected", rejected_ids, rejected_labels)):
            if ids[:P] != prompt_ids:
                raise SampleError(self.path, line, sid, f"the chat format renders the prompt differently before the "
                                  f"{name} answer; a preference prompt must be the start of both conversations")
            labels[:P - 1] = [-100] * (P - 1)  # the prompt's own replies (earlier turns) are not trained on
            if all(x == -100 for x in labels):
                raise SampleError(self.path, line, sid, f"no supervised tokens in the {name} answer (the prompt fills "
                                  "data.max_len)")
        return PreferenceExample(ex.id, ex.line, ex.input_ids, ex.labels, ex.media, ex.messages, ex.blocks, rejected,
                                 rejected_ids, rejected_labels, len(prompt))

    def __getitem__(self, i: int) -> PreferenceItem:
        def decode(ex: PreferenceExample) -> PreferenceItem:
            counts = {"image": len(ex.media["image"]), "audio": sum(ex.blocks.get("audio", []))}
            chosen = self.with_media(Item(ex.id, ex.input_ids, ex.labels), ex, counts)
            return PreferenceItem(ex.id, chosen, Item(ex.id, ex.rejected_ids, ex.rejected_labels, chosen.media))
        return decode_or_skip(self, i, decode)


@dataclass
class PreferenceBatch:
    """S preference samples as one Batch of 2S padded rows, TRL's concatenated form: rows [0, S) hold each prompt
    with its chosen answer, rows [S, 2S) with its rejected one. The prompt's media are there once per sample, and
    each Media's slots list their placeholders in the chosen rows, then in the rejected rows (the same positions),
    so that the aligner and the projectors run once for both rows."""
    rows: Batch
    skipped: list[dict] = field(default_factory=list)

    @property
    def pairs(self) -> int:  # S
        return len(self.rows.ids) // 2

    @property
    def ids(self) -> list[str]:  # (S,)
        return self.rows.ids[:self.pairs]

    @property
    def lengths(self) -> list[int]:  # (2S,)
        return self.rows.lengths

    def apply(self, fn) -> "PreferenceBatch":
        """A batch with `fn` applied to every tensor (host lists are shared)."""
        return replace(self, rows=self.rows.apply(fn))

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return replace(self, rows=self.rows.to(device))

    def pin_memory(self) -> "PreferenceBatch":
        return replace(self, rows=self.rows.pin_memory())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, in a fixed order (the inputs of a recorded CUDA graph)."""
        return self.rows.tensors()

    def pad_static(self, multiple: int) -> "PreferenceBatch":
        """`Batch.pad_static` of the rows, each medium's two copies of slots (chosen, rejected) padded alike."""
        return replace(self, rows=self.rows.pad_static(multiple, copies=2))

    def count(self) -> torch.Tensor:
        """What the DPO loss is averaged over: the pairs. () float32, made on the device (a recorded step makes
        it too)."""
        return torch.full((), float(self.pairs), device=self.rows.label_weight.device)

    def chosen_tokens(self) -> torch.Tensor:
        """What the SFT term is averaged over: the chosen answers' labelled tokens. () float32."""
        chosen = self.rows.sample_index.flatten()[self.rows.label_index] < self.pairs
        return torch.where(chosen, self.rows.label_weight, 0.0).sum()

    def groups(self) -> torch.Tensor:
        """(3, S) bool: the pairs that are text-only, hold an image, hold audio."""
        return self.rows.groups()[:, :self.pairs]


def collate_preferences(items: list[PreferenceItem], pad_id: int, pad_multiple: int = 1) -> PreferenceBatch:
    """Chosen rows, then rejected rows, padded as `collate` pads them, with each sample's media once."""
    rows = collate([it.chosen for it in items] + [it.rejected for it in items], pad_id, pad_multiple=pad_multiple)
    media = {}
    for m, x in rows.media.items():  # collate gave each row its media: keep the chosen rows' copy
        def first_half(t):
            return None if t is None else t[:len(t) // 2]
        media[m] = Media(x.slots, first_half(x.raw), first_half(x.tokens), first_half(x.pooled))
    return PreferenceBatch(replace(rows, media=media), [s for it in items for s in it.skipped])

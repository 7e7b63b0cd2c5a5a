"""The tokenizer of a Hugging Face folder (tokenizer.json through `tokenizers`) and the chat formats of the
supported families, written in code: each renders the same ids as its family's official Jinja template, and
marks which tokens are the assistant's replies (the trained ones).

    tok = load_tokenizer("path/to/Qwen2.5-0.5B")
    ids, is_reply = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from weights import read_json


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



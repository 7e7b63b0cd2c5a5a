"""Data of mmlora: conversations -> tokens, labels and media; media decoding; collate and packing; demo assets.

(This file grows with the data pipeline; the tokenizer trainer below also makes the demo's tokenizer.)
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<audio>"]


def train_tokenizer(texts: list[str], folder: str | Path, vocab_size: int = 512,
                    special_tokens: list[str] = CHAT_SPECIAL_TOKENS, chat_template: str | None = None,
                    eos_token: str = "<|im_end|>") -> None:
    """Train a byte-level BPE `tokenizer.json` (GPT-2 style, as Qwen and Llama-3 use) and its tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": eos_token, "pad_token": "<|endoftext|>", "bos_token": None}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))

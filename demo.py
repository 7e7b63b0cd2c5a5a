"""The embedded demo, "shapes and tones": its data, its tokenizer, its tiny LLM and its aligner, made on first use.

    demo.ensure_demo(".cache/demo")   # data/ (conversations, preference pairs, Phase-1 pairs, media), llm/
                                      # (tokenizer + weights), aligner-init/ (random), then Phase 1 -> align/aligner/
    python demo.py .cache/demo --phase1 [--device cuda:0]      # the same from the command line (train.py's way)

Images of a coloured shape in one quadrant (32x32), or of one to three shapes; one-second clips of high or low
beeps; short questions about them with one-word answers, the same questions as preference pairs (the right answer
against a near miss, for DPO: configs/demo-dpo.toml), and Phase-1 pairs that describe them ("a red circle at the top
left", "three fast high beeps", an image of three shapes with a clip of three beeps). Everything is
generated from a seed, so two machines make the same assets. `configs/demo.toml` sets `data.make_demo`, so the
README's first command makes them, aligns the encoders with Phase 1 (configs/demo-align.toml), then trains:
train.py runs this file as a program of its own, since the demo's Phase 1 is itself a run of train.py's loop.
"""
from __future__ import annotations

import json
import math
import sys
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lora
from model import LLM, LLMConfig, save_llm
from tokenizer import load_tokenizer
from encoders import Aligner, AlignerConfig, EncoderConfig, save_aligner
from config import load_config
from distributed import World

# special tokens of every chat format (and the media placeholders), so that the demo's tokenizer serves them all
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<audio>"]


SHAPES, COLOURS = ("circle", "square", "triangle"), {"red": (220, 40, 40), "green": (40, 200, 60),
                                                    "blue": (50, 80, 230), "yellow": (230, 210, 40)}
PLACES = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
IMAGE_QUESTIONS = {"shape": "What shape is in the image?", "colour": "What colour is the shape?",
                   "place": "Where is the shape?"}
AUDIO_QUESTIONS = {"count": "How many beeps are there?", "pitch": "Is the tone high or low?",
                   "rhythm": "Are the beeps fast or slow?"}


def train_tokenizer(texts: list[str], folder: str | Path, vocab_size: int = 512,
                    special_tokens: list[str] = CHAT_SPECIAL_TOKENS, eos_token: str = "<|im_end|>") -> None:
    """Train a byte-level BPE `tokenizer.json` (GPT-2 style, as Qwen and Llama-3 use) and its tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": eos_token, "pad_token": "<|endoftext|>", "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def draw_shape(rng: np.random.Generator, shape: str, colour: str, place: str, size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 image: one filled shape in one quadrant, on a dark noisy background."""
    img = rng.integers(0, 25, (size, size, 3)).astype(np.uint8)
    h = size // 2
    cy = (h // 2 if place.startswith("top") else h + h // 2) + int(rng.integers(-2, 3))
    cx = (h // 2 if place.endswith("left") else h + h // 2) + int(rng.integers(-2, 3))
    r = int(rng.integers(6, 8))
    yy, xx = np.mgrid[:size, :size]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
    else:  # triangle, apex up
        mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = COLOURS[colour]
    return img


def make_tones(rng: np.random.Generator, count: int, pitch: str, rhythm: str, rate: int = 16000) -> np.ndarray:
    """One second of int16 audio: `count` beeps of a high or low tone, close together (fast) or spread (slow)."""
    freq = (1500.0 if pitch == "high" else 350.0) * float(rng.uniform(0.95, 1.05))
    beep, gap = (0.08, 0.06) if rhythm == "fast" else (0.12, 0.18)
    x = rng.normal(0, 0.01, rate)
    start = float(rng.uniform(0.02, 0.1))
    t = np.arange(int(beep * rate)) / rate
    for _ in range(count):
        s = int(start * rate)
        x[s:s + t.size] += 0.5 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size)
        start += beep + gap
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Write int16 samples (num_samples,) or (num_samples, channels) as a PCM WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(samples.dtype.itemsize)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def draw_count(rng: np.random.Generator, count: int, size: int = 32) -> tuple[np.ndarray, str, str]:
    """A (size, size, 3) uint8 image of `count` small shapes of one kind and colour in distinct quadrants, with
    that kind and colour."""
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    img = np.zeros((size, size, 3), np.uint8)
    for place in rng.choice(PLACES, count, replace=False):
        one = draw_shape(rng, shape, colour, str(place), size)
        img = np.maximum(img, one)  # each drawing adds its shape; the backgrounds' noise overlaps
    return img, shape, colour


def random_tones(rng: np.random.Generator, count: int | None = None) -> tuple[np.ndarray, int, str, str]:
    """A clip of random beeps (or `count` of them) with its count, pitch and rhythm."""
    count = int(rng.integers(1, 4)) if count is None else count
    pitch, rhythm = str(rng.choice(["high", "low"])), str(rng.choice(["fast", "slow"]))
    return make_tones(rng, count, pitch, rhythm), count, pitch, rhythm


def beeps(count: int, pitch: str, rhythm: str) -> str:
    """What a clip sounds like, in words: "three fast high beeps", "one low beep"."""
    return f"{NUMBERS[count]} {pitch} beep" if count == 1 else f"{NUMBERS[count]} {rhythm} {pitch} beeps"


def demo_pair(rng: np.random.Generator, i: int, media: Path, split: str) -> dict:
    """One Phase-1 pair: an image with its description, a clip with its description, or an image of N shapes with
    a clip of N beeps."""
    kind = rng.choice(["image-text", "audio-text", "image-audio"], p=[0.4, 0.4, 0.2])
    pair: dict = {"id": f"pair-{split}-{i:05d}"}
    stem = f"media/pair-{split}-{i:05d}"
    if kind != "audio-text":
        if kind == "image-text" and rng.random() < 0.5:  # one shape, described with where it is
            shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PLACES)
            img, text = draw_shape(rng, shape, colour, place), f"a {colour} {shape} at the {place}"
        else:
            count = int(rng.integers(1, 4))
            img, shape, colour = draw_count(rng, count)
            text = f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''}"
        np.save(media.parent / f"{stem}.npy", img)
        pair["image"] = f"{stem}.npy"
        if kind == "image-text":
            pair["text"] = text
    if kind != "image-text":
        wave, count, pitch, rhythm = random_tones(rng, count if kind == "image-audio" else None)
        write_wav(media.parent / f"{stem}.wav", wave, 16000)
        pair["audio"] = f"{stem}.wav"
        if kind == "audio-text":
            pair["text"] = beeps(count, pitch, rhythm)
        else:
            pair["group"] = NUMBERS[count]  # in retrieval, any image and clip of one count match
    return pair


COUNT_QUESTION = "How many are there?"


def transfer_sample(rng: np.random.Generator, i: int, media: Path, split: str) -> dict:
    """The cross-modal transfer test: training asks about images only (how many shapes, of which kind and colour);
    validation asks the same "how many?" about clips of beeps, which Phase 2 never hears."""
    stem = f"media/transfer-{split}-{i:05d}"
    if split == "train":
        count = int(rng.integers(1, 4))
        img, shape, colour = draw_count(rng, count)
        np.save(media.parent / f"{stem}.npy", img)
        q, a = [(COUNT_QUESTION, NUMBERS[count]), (IMAGE_QUESTIONS["shape"], shape),
                (IMAGE_QUESTIONS["colour"], colour)][int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
        return {"id": f"transfer-{split}-{i:05d}", "image": f"{stem}.npy",
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
    wave, count, _, _ = random_tones(rng)
    write_wav(media.parent / f"{stem}.wav", wave, 16000)
    return {"id": f"transfer-{split}-{i:05d}", "audio": [f"{stem}.wav"],
            "conversations": [{"from": "human", "value": "<audio>\n" + COUNT_QUESTION},
                              {"from": "gpt", "value": NUMBERS[count]}]}


def demo_sample(rng: np.random.Generator, i: int, media: Path, split: str) -> dict:
    """One conversation of the demo: about an image, a clip, both (two turns), or text only."""
    kind = rng.choice(["image", "audio", "both", "text"], p=[0.35, 0.35, 0.2, 0.1])
    sample: dict = {"id": f"{split}-{i:05d}"}
    turns = []
    if kind in ("image", "both"):
        shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PLACES)
        name = f"media/{split}-{i:05d}.npy"
        np.save(media.parent / name, draw_shape(rng, shape, colour, place))
        sample["image"] = name
        q = rng.choice(list(IMAGE_QUESTIONS))
        turns.append(("<image>\n" + IMAGE_QUESTIONS[q], {"shape": shape, "colour": colour, "place": place}[q]))
    if kind in ("audio", "both"):
        count, pitch, rhythm = int(rng.integers(1, 4)), rng.choice(["high", "low"]), rng.choice(["fast", "slow"])
        name = f"media/{split}-{i:05d}.wav"
        write_wav(media.parent / name, make_tones(rng, count, pitch, rhythm), 16000)
        sample["audio"] = [name]
        q = rng.choice(list(AUDIO_QUESTIONS) if count > 1 else ["count", "pitch"])  # one beep has no rhythm
        turns.append(("<audio>\n" + AUDIO_QUESTIONS[q], {"count": NUMBERS[count], "pitch": pitch, "rhythm": rhythm}[q]))
    if kind == "text":
        a, b = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        turns.append((f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b]))
    sample["conversations"] = [t for q, a in turns
                               for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return sample


def near_miss(rng: np.random.Generator, answer: str) -> str:
    """A wrong answer close to the right one: another colour, shape or place, the other tone or rhythm, or a count
    (or sum) one off."""
    for words in (list(COLOURS), SHAPES, PLACES, ("high", "low"), ("fast", "slow")):
        if answer in words:
            return str(rng.choice([w for w in words if w != answer]))
    n = NUMBERS.index(answer)
    return str(rng.choice([NUMBERS[k] for k in (n - 1, n + 1) if 0 <= k < len(NUMBERS)]))


def preference_pair(rng: np.random.Generator, sample: dict) -> dict:
    """A conversation as a preference pair in TRL's conversational form: its turns up to the last question as the
    prompt, its last answer as `chosen` and a near miss of it as `rejected`; the same media."""
    turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
             for t in sample["conversations"]]
    media = {k: sample[k] for k in ("image", "audio") if k in sample}
    answer = turns[-1]["content"]
    return {"id": f"pref-{sample['id']}", **media, "prompt": turns[:-1],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": near_miss(rng, answer)}]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_demo(folder: str | Path, seed: int = 0, n_train: int = 6000, n_val: int = 120, n_pairs: int | None = None,
              n_transfer: int | None = None, pretrain_steps: int = 800, llm_config=None, aligner_config=None,
              log=lambda msg: None) -> Path:
    """Make the demo's data, tokenizer, tiny LLM and initial aligner in `folder` (deterministic for a seed).

    data/: train/val.jsonl (conversations), preference_train/val.jsonl (the same questions as preference pairs),
    pairs_train/val.jsonl (Phase-1 pairs; `n_pairs` defaults to two thirds of `n_train`), transfer_train/val.jsonl
    (the cross-modal transfer test; `n_transfer`: a third) and their media. The LLM is briefly pretrained on the
    demo's text so LoRA adapts a model that knows the language. aligner-init/ is a random aligner, the starting
    point of Phase 1 (`ensure_demo` runs it). `llm_config` / `aligner_config` give other shapes (bench.py:
    Qwen2.5-0.5B's, stored in bf16, random weights for GPU runs of train.py). `log` receives a line per stage.
    Returns `folder`."""
    folder = Path(folder)
    n_pairs = n_train * 2 // 3 if n_pairs is None else n_pairs
    n_transfer = n_train // 3 if n_transfer is None else n_transfer
    log(f"demo: writing {n_train} + {n_val} conversations, {n_pairs} + {n_val} Phase-1 pairs and {n_transfer} + "
        f"{n_val} transfer-test samples with their images and clips to {folder / 'data'}")
    splits = write_data(folder / "data", seed, n_train, n_val, n_pairs, n_transfer)
    texts = tokenizer_texts(splits["train"])
    llm_dir = folder / "llm"
    log("demo: training a byte-level BPE tokenizer on their text")
    train_tokenizer(texts, llm_dir, vocab_size=400)
    tok = load_tokenizer(llm_dir, chat_format="chatml")

    torch.manual_seed(seed)
    cfg = LLMConfig(architecture="Qwen2ForCausalLM", vocab_size=tok.vocab_size, hidden_size=128,
                    intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
                    qkv_bias=True)
    if llm_config is not None:  # a model vocabulary may be larger than the tokenizer's, as Qwen's is
        cfg = replace(llm_config, vocab_size=max(llm_config.vocab_size, tok.vocab_size))
    # the demo's recipe pretrains from PyTorch's default initialisation; a model of a given shape stays untrained,
    # so it gets Hugging Face's, whose loss starts near ln(vocab)
    llm = LLM(cfg) if llm_config is None else LLM(cfg).init_weights()
    if pretrain_steps:
        log(f"demo: pretraining a {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M-parameter LLM for "
            f"{pretrain_steps} steps on that text")
        pretrain(llm, [tok.render([{"role": "user", "content": s["conversations"][0]["value"]},
                                   {"role": "assistant", "content": s["conversations"][1]["value"]}])[0]
                       for s in splits["train"]], pretrain_steps, seed)
    save_llm(llm if llm_config is None else llm.to(torch.bfloat16), llm_dir)
    acfg = aligner_config or AlignerConfig(dim=64, image=EncoderConfig(64, 2, 4), audio=EncoderConfig(64, 2, 4),
                                           image_size=32, patch_size=8, sample_rate=16000, clip_seconds=1.0,
                                           n_fft=400, hop_length=160, n_mels=40)
    log("demo: writing a random aligner (image and audio encoders), Phase 1's starting point")
    save_aligner(Aligner(acfg), folder / "aligner-init")
    (folder / "READY").write_text("demo assets complete\n")
    return folder


def write_data(folder: Path, seed: int, n_train: int, n_val: int, n_pairs: int, n_transfer: int) -> dict:
    """The demo's data files in `folder` with their media: the conversations, the Phase-1 pairs, the transfer test
    and the conversations' questions as preference pairs. Returns the conversations of each split."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": [demo_sample(rng, i, media, "train") for i in range(n_train)],
              "val": [demo_sample(rng, i, media, "val") for i in range(n_val)]}
    for split, samples in splits.items():
        write_jsonl(folder / f"{split}.jsonl", samples)
    for split, n in (("train", n_pairs), ("val", n_val)):
        write_jsonl(folder / f"pairs_{split}.jsonl", [demo_pair(rng, i, media, split) for i in range(n)])
    for split, n in (("train", n_transfer), ("val", n_val)):
        write_jsonl(folder / f"transfer_{split}.jsonl", [transfer_sample(rng, i, media, split) for i in range(n)])
    near = np.random.default_rng(seed + 1)  # a stream of its own: the files above are the same with or without it
    for split, samples in splits.items():
        write_jsonl(folder / f"preference_{split}.jsonl", [preference_pair(near, x) for x in samples])
    return splits


def tokenizer_texts(train: list[dict]) -> list[str]:
    """What the demo's tokenizer learns from: the training conversations' turns, the words of the Phase-1 pairs'
    captions and of the transfer test's answers."""
    texts = [t["value"].replace("<image>\n", "").replace("<audio>\n", "") for s in train for t in s["conversations"]]
    texts += [f"{NUMBERS[n]} {c} {s}s" for n in range(2, 4) for c in COLOURS for s in SHAPES]  # the pairs' words
    texts += [beeps(n, p, r) for n in range(1, 4) for p in ("high", "low") for r in ("fast", "slow")]
    return texts + [COUNT_QUESTION, "at the"]


def pretrain(llm, sequences: list[list[int]], steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> None:
    """Next-token training of the whole LLM on token sequences (placeholder tokens dropped): the demo LLM's
    'pretraining', so that Phase 2 starts from a model that knows the demo's language. q, k and v run as one
    matmul, as in train.py (`lora.fuse_qkv`)."""
    lora.fuse_qkv(llm)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    llm.train()
    for step in range(steps):
        idx = torch.randint(0, len(sequences), (batch,), generator=g).tolist()
        rows = [sequences[i] for i in idx]
        T = max(len(r) for r in rows)
        ids = torch.zeros(batch, T, dtype=torch.long)
        tgt = torch.full((batch, T), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            tgt[b, :len(r) - 1] = torch.tensor(r[1:])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(llm(ids).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    llm.eval()


ALIGN_CONFIG = Path(__file__).parent / "configs" / "demo-align.toml"


def ensure_demo(folder: str | Path, phase1: bool = True, device: torch.device | None = None, **kw) -> Path:
    """Make the demo assets in `folder` unless a complete set is already there, saying what it makes; with
    `phase1`, also align the demo's encoders (Phase 1, configs/demo-align.toml, into `folder`/align/: an
    interrupted run resumes there, in one process on `device`) unless its aligner is there."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:  # one process makes the assets; another started meanwhile waits
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"demo: another process is making the demo's assets in {folder}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        make_missing(folder, phase1, device, **kw)
    return folder


def make_missing(folder: Path, phase1: bool, device: torch.device | None, **kw) -> None:
    """`ensure_demo`'s work, under its lock: the assets, then Phase 1, unless they are there."""
    if not (folder / "READY").is_file():
        print(f"demo: first run, making the demo's assets in {folder} (about a minute; later runs reuse them)",
              flush=True)
        make_demo(folder, log=lambda msg: print(msg, flush=True), **kw)
    if phase1 and not (folder / "align" / "DONE").is_file():
        import train  # the demo sits above training: train.py runs this file (`main`), never imports it

        print(f"demo: Phase 1, aligning the demo's image and audio encoders with the LLM's text ({ALIGN_CONFIG.name}, "
              f"into {folder / 'align'})", flush=True)
        d = folder / "data"
        cfg = load_config(str(ALIGN_CONFIG), [
            f"--model.llm={folder / 'llm'}", f"--model.aligner={folder / 'aligner-init'}",
            f"--data.train_file={d / 'pairs_train.jsonl'}", f"--data.val_file={d / 'pairs_val.jsonl'}",
            "--data.make_demo=", f"--run.out_dir={folder / 'align'}"])
        if train.fit(cfg, World(device=device or torch.device("cpu"))).get("stopped"):  # even under torchrun
            raise PhaseOneStopped(f"Phase 1 was stopped; run the command again to resume it in {folder / 'align'}")
        (folder / "align" / "DONE").write_text("Phase 1 complete\n")


class PhaseOneStopped(RuntimeError):
    """A signal stopped the demo's Phase 1, which saved an emergency checkpoint to resume from."""


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="make the demo's assets (and, with --phase1, its aligner) unless there")
    ap.add_argument("folder")
    ap.add_argument("--phase1", action="store_true", help="also align the demo's encoders (Phase 1)")
    ap.add_argument("--device", default="cpu", help="where Phase 1 runs (cpu, cuda, cuda:N)")
    args = ap.parse_args(argv)
    try:
        ensure_demo(args.folder, args.phase1, torch.device(args.device))
    except PhaseOneStopped as e:  # a clean stop, which train.py (that started this process) tells from a failure
        import train
        print(f"demo: {e}", file=sys.stderr, flush=True)
        sys.exit(train.DEMO_STOPPED)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"demo: {e}") from None


if __name__ == "__main__":
    main()

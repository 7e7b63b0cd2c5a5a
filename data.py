"""Data of mmlora: conversations -> tokens, labels and media; media decoding; collate and packing; feature cache;
the embedded demo ("shapes and tones").

    ds = ConversationDataset("data/train.jsonl", tokenizer, aligner_config, tokens_per_media={"image": 16, "audio": 8})
    batch = collate([ds[0], ds[1]], pad_id=tokenizer.pad_id)          # or pack=True, max_len=...

A sample (DESIGN 5) is LLaVA-style `{"id", "image", "audio", "conversations": [{"from", "value"}]}` or
`{"messages": [{"role", "content"}]}`. Each `<image>` / `<audio>` placeholder expands to K reserved token ids that
the model overwrites with projected features. Labels are set only on assistant replies and their end-of-turn token,
from the chat format's per-token mask.
"""
from __future__ import annotations

import json
import math
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import MODALITIES, AlignerConfig, Tokenizer

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<audio>"]


class SampleError(ValueError):
    """A sample that cannot be trained on: names the file, the line, the sample id and the reason."""

    def __init__(self, file, line: int | None, sample_id, reason: str):
        self.file, self.line, self.sample_id, self.reason = str(file), line, sample_id, reason
        super().__init__(f"{file}:{line if line is not None else '?'}: sample {sample_id!r}: {reason}")


# ----------------------------------------------------------------------------------------------------------------
# Media decoding


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Decode a WAV (8/16/24/32-bit PCM, any channels, any rate) or `.npy` waveform to float32 mono in [-1, 1],
    resampled to `sample_rate`. Returns (num_samples,). Any undecodable file is a ValueError naming it."""
    path = Path(path)
    try:
        x, rate = read_npy_audio(path, sample_rate) if path.suffix.lower() == ".npy" else read_wav(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    return resample(torch.from_numpy(np.ascontiguousarray(x)), rate, sample_rate)


def read_npy_audio(path: Path, rate: int) -> tuple[np.ndarray, int]:
    x = np.load(path, allow_pickle=False).astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] < x.shape[1] else 1)
    if x.ndim != 1:
        raise ValueError(f"an audio .npy holds (num_samples,) or (channels, num_samples), got {x.shape}")
    return x, rate


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """PCM samples as float32 mono in [-1, 1], and the file's rate."""
    with wave.open(str(path), "rb") as w:
        width, channels, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:  # 24-bit: sign-extend three little-endian bytes into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{8 * width}-bit WAV is not supported (8, 16, 24 or 32-bit PCM)")
    if rate <= 0 or channels <= 0 or x.size % channels:
        raise ValueError(f"malformed WAV header (rate {rate}, {channels} channels)")
    return x.reshape(-1, channels).mean(axis=1), rate


def resample(wav: torch.Tensor, rate: int, target: int, zero_crossings: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling with a Hann-windowed sinc filter, the polyphase scheme of torchaudio's `resample`
    (J. O. Smith, "Digital Audio Resampling"). (num_samples,) at `rate` -> at `target`."""
    if rate == target or wav.numel() == 0:
        return wav
    g = math.gcd(rate, target)
    orig, new = rate // g, target // g
    base = min(orig, new) * rolloff  # cut-off below the lower Nyquist frequency
    width = math.ceil(zero_crossings * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig  # (1, L)
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx) * base  # (new, L)
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    kernels = (torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * base / orig).float()
    x = F.pad(wav[None, None], (width, width + orig))  # (1, 1, n + pads)
    y = F.conv1d(x, kernels[:, None], stride=orig)  # (1, new, frames)
    return y[0].T.reshape(-1)[: math.ceil(new * wav.numel() / orig)]


def load_image(path: str | Path) -> torch.Tensor:
    """Decode `.npy` (H, W, 3) or (3, H, W) uint8, or PNG/JPEG through Pillow, to a uint8 tensor (3, H, W).
    Any undecodable file is a ValueError naming it; PNG/JPEG without Pillow is an ImportError saying what to do."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(f"{path}: decoding PNG/JPEG needs Pillow: `pip install pillow`, or store images as "
                              ".npy uint8 arrays") from None
    try:
        if path.suffix.lower() == ".npy":
            x = np.load(path, allow_pickle=False)
            if x.ndim == 3 and x.shape[-1] == 3 and x.shape[0] != 3:
                x = x.transpose(2, 0, 1)
            if x.ndim != 3 or x.shape[0] != 3 or x.dtype != np.uint8:
                raise ValueError(f"an image .npy holds uint8 (H, W, 3) or (3, H, W), got {x.dtype} {x.shape}")
            return torch.from_numpy(np.ascontiguousarray(x))
        with Image.open(path) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(x.copy()).permute(2, 0, 1)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def preprocess_image(image: torch.Tensor, cfg: AlignerConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, S, S): resized to the aligner's `image_size`, normalised with its mean/std."""
    x = image[None].float() / 255.0
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def preprocess_audio(wav: torch.Tensor, cfg: AlignerConfig) -> torch.Tensor:
    """(num_samples,) at the aligner's rate -> (clip_seconds * sample_rate,), cut or zero-padded."""
    n = int(cfg.sample_rate * cfg.clip_seconds)
    return F.pad(wav[:n], (0, max(0, n - wav.shape[0])))


def check_media(path: Path) -> None:
    """Read a media file's header, so that a missing or undecodable file is found before training starts."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.load(path, mmap_mode="r", allow_pickle=False)
    elif suffix == ".wav":
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() not in (1, 2, 3, 4) or w.getnframes() == 0:
                raise ValueError("empty WAV or unsupported sample width")
    else:
        load_image(path)


# ----------------------------------------------------------------------------------------------------------------
# Conversations -> tokens and labels


def read_records(path: Path) -> list[tuple[int, object]]:
    """(line, record) pairs of a `.json` file (one JSON list; if it does not parse, no sample can be told apart
    and the file is the error) or of JSON Lines (any other name; a broken line is kept as that line's error)."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(path, getattr(e, "lineno", None), None, f"not valid UTF-8 JSON ({e})") from None
        if not isinstance(records, list):
            raise SampleError(path, 1, None, "a .json dataset must hold a list of samples")
        return list(enumerate(records))
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                out.append((i, SampleError(path, i, None, f"not valid UTF-8 JSON ({e})")))
    return out


def to_messages(sample: dict) -> list[dict]:
    """Both accepted forms -> [{"role", "content"}]."""
    if "messages" in sample:
        turns, role_key, text_key = sample["messages"], "role", "content"
    elif "conversations" in sample:
        turns, role_key, text_key = sample["conversations"], "from", "value"
    else:
        raise ValueError("sample has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversation is empty or not a list")
    out = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get(text_key), str):
            raise ValueError(f"each turn needs a string {text_key!r}")
        role = ROLES.get(t.get(role_key)) if isinstance(t.get(role_key), str) else None
        if role is None:
            raise ValueError(f"unknown role {t.get(role_key)!r}; known: {sorted(ROLES)}")
        out.append({"role": role, "content": t[text_key]})
    return out


def media_paths(sample: dict, modality: str) -> list[str]:
    v = sample.get(modality, [])
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"'{modality}' must be a path or a list of paths")
    return v


def resolve_media(root: Path, rel: str, allow_outside: bool) -> Path:
    p = Path(rel)
    full = (root / p).resolve()
    if not allow_outside and (p.is_absolute() or not full.is_relative_to(root.resolve())):
        raise ValueError(f"media path {rel!r} leaves the data folder {root}; set data.allow_outside_paths = true "
                         "to allow it")
    if not full.is_file():
        raise ValueError(f"media file {full} not found")
    return full


def encode_conversation(messages: list[dict], tok: Tokenizer, tokens_per_media: dict[str, int], max_len: int,
                        truncate: bool, add_generation_prompt: bool = False
                        ) -> tuple[list[int], list[int], dict[str, int]]:
    """Render a conversation, expand each placeholder to K media tokens and build shifted labels: labels[t] is
    the target of position t (token t+1 when it belongs to an assistant reply, else -100).

    A sequence longer than `max_len` is an error unless `truncate`; truncation never cuts a block of media tokens
    (it cuts before the block). Returns ids, labels and the number of media of each modality kept."""
    used = [m for m in MODALITIES if any(PLACEHOLDERS[m] in x["content"] for x in messages)]
    media_ids = {m: tok.media_token_id(m) for m in used}
    msgs = []
    for x in messages:
        content = x["content"]
        for m in used:
            content = content.replace(PLACEHOLDERS[m], tok.tk.id_to_token(media_ids[m]) * tokens_per_media[m])
        msgs.append({"role": x["role"], "content": content})
    ids, is_reply = tok.render(msgs, add_generation_prompt)
    if len(ids) > max_len:
        if not truncate:
            raise ValueError(f"sample is {len(ids)} tokens, longer than data.max_len = {max_len} "
                             "(raise data.max_len, or set data.truncate = true to cut it)")
        cut = max_len
        while 0 < cut < len(ids) and ids[cut] in media_ids.values() and ids[cut - 1] == ids[cut]:
            cut -= 1  # inside a block of media tokens: move the cut to the block's start
        ids, is_reply = ids[:cut], is_reply[:cut]
    labels = [ids[t + 1] if is_reply[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    counts = {m: sum(1 for i in ids if i == media_ids[m]) // tokens_per_media[m] for m in used}
    return ids, labels, counts


# ----------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[Path]]  # modality -> files, in order of their placeholders
    messages: list[dict]


class ConversationDataset(torch.utils.data.Dataset):
    """A JSONL / JSON-list conversation file, tokenized and checked when built, so that a bad sample stops the run
    (`on_error="raise"`) or is left out and listed in `self.skipped` (`on_error="skip"`) before training starts."""

    def __init__(self, path: str | Path, tok: Tokenizer, aligner_config: AlignerConfig,
                 tokens_per_media: dict[str, int], max_len: int, truncate: bool = False, on_error: str = "raise",
                 allow_outside_paths: bool = False, feature_cache: str | Path | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.root = Path(path), Path(path).parent
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: dataset file not found")
        self.tok, self.aligner_config, self.tokens_per_media = tok, aligner_config, tokens_per_media
        self.max_len, self.truncate, self.allow_outside = max_len, truncate, allow_outside_paths
        self.cache = FeatureCache(feature_cache) if feature_cache else None
        self.examples: list[Example] = []
        self.skipped: list[dict] = []
        for line, record in read_records(self.path):
            try:
                self.examples.append(self.encode(line, record))
            except SampleError as e:
                if on_error == "raise":
                    raise
                self.skipped.append({"file": e.file, "line": e.line, "id": e.sample_id, "reason": e.reason})
        if not self.examples:
            raise ValueError(f"{self.path}: no usable samples ({len(self.skipped)} skipped)")

    def encode(self, line: int, record) -> Example:
        if isinstance(record, SampleError):
            raise record
        if not isinstance(record, dict):
            raise SampleError(self.path, line, None, f"a sample is a JSON object, got {type(record).__name__}")
        sid = str(record.get("id", f"line{line}"))
        try:
            messages = to_messages(record)
            files = {}
            for m in MODALITIES:
                paths = media_paths(record, m)
                n = sum(x["content"].count(PLACEHOLDERS[m]) for x in messages)
                if n != len(paths):
                    raise ValueError(f"{n} {PLACEHOLDERS[m]} placeholders but {len(paths)} {m} files given")
                files[m] = [resolve_media(self.root, p, self.allow_outside) for p in paths]
                if self.cache is None:
                    for f in files[m]:
                        try:
                            check_media(f)
                        except Exception as e:  # any decoder failure is this sample's error
                            raise ValueError(f"cannot decode {m} file {f}: {e}") from None
            ids, labels, counts = encode_conversation(messages, self.tok, self.tokens_per_media, self.max_len,
                                                      self.truncate)
        except ValueError as e:
            raise SampleError(self.path, line, sid, str(e)) from None
        if all(x == -100 for x in labels):
            raise SampleError(self.path, line, sid, "no supervised tokens (no assistant reply within data.max_len)")
        return Example(sid, ids, labels, {m: files[m][:counts.get(m, 0)] for m in MODALITIES}, messages)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return self.with_media({"id": ex.id, "input_ids": ex.input_ids, "labels": ex.labels}, ex,
                               {m: len(ex.media[m]) for m in MODALITIES})

    def with_media(self, item: dict, ex: Example, counts: dict[str, int]) -> dict:
        """Add the first `counts[m]` media of each modality (decoded, or features from the cache) to `item`, and
        the positions of their placeholder tokens, so that the model never has to search the batch for them."""
        item["has"] = [counts[m] > 0 for m in MODALITIES]
        for m in MODALITIES:
            if not counts[m]:
                continue
            media_id = self.tok.media_token_id(m)
            item[f"{m}_slots"] = [t for t, x in enumerate(item["input_ids"]) if x == media_id]
            if self.cache is not None:
                item[f"{m}_tokens"], item[f"{m}_pooled"] = self.cache.get(ex.id, m, counts[m])
            else:
                item[m] = torch.stack([self.load(m, f) for f in ex.media[m][:counts[m]]])
        return item

    def prompt(self, i: int) -> tuple[dict, str]:
        """The sample up to its last user turn, ready for generation, and the last reply as the expected answer."""
        ex = self.examples[i]
        last = max(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
        ids, _, counts = encode_conversation(ex.messages[:last], self.tok, self.tokens_per_media, self.max_len,
                                             truncate=True, add_generation_prompt=True)
        item = {"id": ex.id, "input_ids": ids, "labels": [-100] * len(ids)}
        return self.with_media(item, ex, {m: counts.get(m, 0) for m in MODALITIES}), ex.messages[last]["content"]

    def load(self, modality: str, path: Path) -> torch.Tensor:
        c = self.aligner_config
        try:
            if modality == "image":
                return preprocess_image(load_image(path), c)
            return preprocess_audio(load_audio(path, c.sample_rate), c)
        except Exception as e:
            raise SampleError(self.path, None, None, f"cannot decode {modality} file {path}: {e}") from e


def write_skipped(path: str | Path, skipped: list[dict]) -> None:
    with open(path, "a") as f:
        for s in skipped:
            f.write(json.dumps(s) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Collate: pad, or pack several samples into one row


def collate(items: list[dict], pad_id: int, pack: bool = False, max_len: int | None = None,
            pad_multiple: int = 1, static: bool = False) -> dict:
    """Stack samples into a batch.

    Padded (default): one row per sample, padded on the right; plain causal attention is then exact.
    Packed: samples fill rows of `max_len` tokens (first fit), each with its own positions from 0 and a
    `doc_ids` row, from which the model builds a mask with no attention across samples.
    Media are concatenated in the order their placeholders appear in the flattened batch. Rows are padded to a
    multiple of `pad_multiple` tokens, so that compiled layers see few distinct shapes.

    The host also finds the positions the model indexes by, in the flattened (B*T) batch: `label_index` (M,),
    where labels are set, with `label_weight` (M,) 1.0 for each, and `{modality}_slots` (N,), each media's
    placeholder tokens (items give theirs as `{modality}_slots`, positions within the sample). The GPU then never
    reports a count back to the host.

    `static` (for a training step recorded as a CUDA graph, padded rows only) keeps the shapes few: rows get at
    least one pad token, whose last one (the scratch position) no real token attends to; `label_index` is padded
    to a multiple of the row length with the scratch position at weight 0, and each modality's media to a
    multiple of the batch size with zeros written to the scratch position."""
    if static and pack:
        raise ValueError("static shapes are for padded rows; packed rows vary in number")
    if pack:
        if max_len is None:
            raise ValueError("packing needs max_len")
        rows: list[list[int]] = []
        room: list[int] = []
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            r = next((r for r in range(len(rows)) if room[r] >= n), None)
            if r is None:
                rows.append([])
                room.append(max_len)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= n
    else:
        rows = [[i] for i in range(len(items))]
    T = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows) + int(static)  # the scratch position
    T = -(-T // pad_multiple) * pad_multiple
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    sample_index = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    order = []
    slots: dict[str, list[int]] = {m: [] for m in MODALITIES}
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            n = len(items[i]["input_ids"])
            for m in MODALITIES:
                slots[m] += [b * T + t + s for s in items[i].get(f"{m}_slots", ())]
            input_ids[b, t:t + n] = torch.tensor(items[i]["input_ids"])
            labels[b, t:t + n] = torch.tensor(items[i]["labels"])
            sample_index[b, t:t + n] = i
            position_ids[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = i
            t += n
            order.append(i)
        lengths[b] = t
    label_index = (labels.flatten() != -100).nonzero()[:, 0]
    label_weight = torch.ones(len(label_index))
    batch = {"input_ids": input_ids, "labels": labels, "sample_index": sample_index, "lengths": lengths,
             "modality": torch.tensor([it["has"] for it in items], dtype=torch.bool).view(len(items), len(MODALITIES)),
             "ids": [it["id"] for it in items]}
    if pack:
        batch["position_ids"], batch["doc_ids"] = position_ids, doc_ids
    for key in ("image", "audio", "image_tokens", "image_pooled", "audio_tokens", "audio_pooled"):
        parts = [items[i][key] for i in order if key in items[i]]
        if parts:
            batch[key] = torch.cat(parts)
    if static:
        scratch = B * T - 1
        extra = -len(label_index) % T
        label_index = torch.cat([label_index, torch.full((extra,), scratch)])
        label_weight = torch.cat([label_weight, torch.zeros(extra)])
        for m in MODALITIES:
            media = [k for k in (m, f"{m}_tokens", f"{m}_pooled") if k in batch]
            if not media:
                continue
            n = len(batch[media[0]])
            extra = -n % B
            for k in media:
                batch[k] = torch.cat([batch[k], batch[k].new_zeros(extra, *batch[k].shape[1:])])
            slots[m] += [scratch] * (extra * len(slots[m]) // n)
    batch |= {"label_index": label_index, "label_weight": label_weight}
    batch |= {f"{m}_slots": torch.tensor(s, dtype=torch.long) for m, s in slots.items() if s}
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Feature cache: the frozen aligner's outputs, computed once, in safetensors shards keyed by sample id


def build_feature_cache(dataset: ConversationDataset, aligner, folder: str | Path, device="cpu",
                        shard_samples: int = 1024, num_workers: int = 0) -> int:
    """Run the aligner over every sample's media and write `features-NNNNN.safetensors` + `index.json`;
    `num_workers` DataLoader processes decode the media. Returns the number of samples cached."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [ex.id for ex in dataset.examples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{dataset.path}: the feature cache is keyed by sample id, and ids repeat: {dup}")
    index, shard, n_shard = {}, {}, 0

    def flush():
        nonlocal shard, n_shard
        if shard:
            save_file(shard, str(folder / f"features-{n_shard:05d}.safetensors"))
            n_shard, shard = n_shard + 1, {}

    samples = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)  # workers decode
    with torch.no_grad():
        for item in samples:
            for m in MODALITIES:
                if m in item:
                    tokens, pooled = getattr(aligner, m)(item[m].to(device))
                    shard[f"{item['id']}/{m}/tokens"] = tokens.float().cpu().contiguous()
                    shard[f"{item['id']}/{m}/pooled"] = pooled.float().cpu().contiguous()
            index[item["id"]] = f"features-{n_shard:05d}.safetensors"
            if len(index) % shard_samples == 0:
                flush()
    flush()
    (folder / "index.json").write_text(json.dumps({"aligner": asdict(aligner.config), "samples": index}))
    return len(index)


class FeatureCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no feature cache here; build it with "
                                    "`python train.py --config CONFIG --build_feature_cache`")
        self.index = json.loads(index.read_text())["samples"]
        self.handles = {}

    def get(self, sample_id: str, modality: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        if sample_id not in self.index:
            raise ValueError(f"sample {sample_id!r} is not in the feature cache {self.folder}; rebuild the cache")
        shard = self.index[sample_id]
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        h = self.handles[shard]
        key = f"{sample_id}/{modality}"
        return h.get_tensor(f"{key}/tokens")[:count], h.get_tensor(f"{key}/pooled")[:count]


# ----------------------------------------------------------------------------------------------------------------
# The embedded demo: "shapes and tones"

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


def make_demo(folder: str | Path, seed: int = 0, n_train: int = 6000, n_val: int = 120,
              pretrain_steps: int = 800, llm_config=None, aligner_config=None) -> Path:
    """Make the demo's data, tokenizer, tiny LLM and aligner in `folder` (deterministic for a seed). The LLM is
    briefly pretrained on the demo's text so LoRA adapts a model that knows the language; the aligner is random
    (not Phase-1 trained): its frozen features still carry what the questions ask, and the projectors learn to read
    them. `llm_config` / `aligner_config` give other shapes (bench.py: Qwen2.5-0.5B's, stored in bf16, random
    weights for GPU runs of train.py). Returns `folder`."""
    from dataclasses import replace as with_fields

    from model import LLM, Aligner, AlignerConfig, EncoderConfig, LLMConfig, load_tokenizer, save_aligner, save_llm

    folder = Path(folder)
    media = folder / "data" / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": [demo_sample(rng, i, media, "train") for i in range(n_train)],
              "val": [demo_sample(rng, i, media, "val") for i in range(n_val)]}
    for split, samples in splits.items():
        (folder / "data" / f"{split}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    texts = [t["value"].replace("<image>\n", "").replace("<audio>\n", "")
             for s in splits["train"] for t in s["conversations"]]
    llm_dir = folder / "llm"
    train_tokenizer(texts, llm_dir, vocab_size=400)
    tok = load_tokenizer(llm_dir, chat_format="chatml")

    torch.manual_seed(seed)
    cfg = LLMConfig(architecture="Qwen2ForCausalLM", vocab_size=tok.vocab_size, hidden_size=128,
                    intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
                    qkv_bias=True)
    if llm_config is not None:  # a model vocabulary may be larger than the tokenizer's, as Qwen's is
        cfg = with_fields(llm_config, vocab_size=max(llm_config.vocab_size, tok.vocab_size))
    # the demo's recipe pretrains from PyTorch's default initialisation; a model of a given shape stays untrained,
    # so it gets Hugging Face's, whose loss starts near ln(vocab)
    llm = LLM(cfg) if llm_config is None else LLM(cfg).init_weights()
    if pretrain_steps:
        pretrain(llm, [tok.render([{"role": "user", "content": s["conversations"][0]["value"]},
                                   {"role": "assistant", "content": s["conversations"][1]["value"]}])[0]
                       for s in splits["train"]], pretrain_steps, seed)
    save_llm(llm if llm_config is None else llm.to(torch.bfloat16), llm_dir)
    acfg = aligner_config or AlignerConfig(dim=64, image=EncoderConfig(64, 2, 4), audio=EncoderConfig(64, 2, 4),
                                           image_size=32, patch_size=8, sample_rate=16000, clip_seconds=1.0,
                                           n_fft=400, hop_length=160, n_mels=40)
    save_aligner(Aligner(acfg), folder / "aligner")
    (folder / "READY").write_text("demo assets complete\n")
    return folder


def pretrain(llm, sequences: list[list[int]], steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> None:
    """Next-token training of the whole LLM on token sequences (placeholder tokens dropped): the demo LLM's
    'pretraining', so that Phase 2 starts from a model that knows the demo's language."""
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


def ensure_demo(folder: str | Path, **kw) -> Path:
    """Make the demo assets in `folder` unless a complete set is already there."""
    folder = Path(folder)
    if not (folder / "READY").is_file():
        make_demo(folder, **kw)
    return folder

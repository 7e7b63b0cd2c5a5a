"""Data of mmlora: conversations -> tokens, labels and media (decoded by media.py); collate and packing into the
typed `Batch` (defined in multimodal.py beside the model that reads it, and named here too as `data.Batch`); the
feature cache; Phase 1's pairs (`PairDataset`, `PairBatch`, `collate_pairs`). DPO's preference pairs, read as
conversations are, live in preference.py.

    ds = ConversationDataset("data/train.jsonl", tokenizer, aligner_config, {"image": 16, "audio": 8}, max_len=512)
    batch = collate([ds[0], ds[1]], pad_id=tokenizer.pad_id)          # a Batch; or pack=True, max_len=...
    batch = batch.to("cuda")

A sample is LLaVA-style `{"id", "image", "audio", "conversations": [{"from", "value"}]}` or
`{"messages": [{"role", "content"}]}`. Each `<image>` / `<audio>` placeholder expands to K reserved token ids that
the model overwrites with projected features. Labels are set only on assistant replies and their end-of-turn token,
from the chat format's per-token mask.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from weights import save_tensors, weights_hash
from tokenizer import Tokenizer
from encoders import AlignerConfig
from media import (audio_samples, audio_windows, check_image, load_audio, load_image, preprocess_audio,
                   preprocess_image)
from multimodal import MODALITIES, Batch, Media

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A sample that cannot be trained on: names the file, the line, the sample id and the reason."""

    def __init__(self, file, line: int | None, sample_id, reason: str):
        self.file, self.line, self.sample_id, self.reason = str(file), line, sample_id, reason
        sample = f" sample {sample_id!r}:" if sample_id is not None else ""  # (a line that is not JSON has no id)
        super().__init__(f"{file}:{line if line is not None else '?'}:{sample} {reason}")


# ----------------------------------------------------------------------------------------------------------------
# Conversations -> tokens and labels


def read_records(path: Path) -> list[tuple[int, object]]:
    """(line, record) pairs of a `.json` file (one JSON list, each element with the line it starts on; if the list
    does not parse, no sample can be told apart and the file is the error) or of JSON Lines (any other name; a
    broken line is kept as that line's error). A UTF-8 byte-order mark (as Windows editors write) is skipped."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if path.suffix.lower() == ".json":
        return json_list_records(path, raw)
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                out.append((i, SampleError(path, i, None, f"not valid UTF-8 JSON ({e})")))
    return out


def json_list_records(path: Path, raw: bytes) -> list[tuple[int, object]]:
    """The elements of a JSON list, each with the line of the file it starts on."""
    try:
        text = raw.decode("utf-8")
        decoder, out = json.JSONDecoder(), []
        i = len(text) - len(text.lstrip())
        if text[i:i + 1] != "[":
            raise SampleError(path, 1, None, "a .json dataset must hold a list of samples")
        i = skip_space(text, i + 1)
        while text[i:i + 1] != "]":
            record, end = decoder.raw_decode(text, i)
            out.append((text.count("\n", 0, i) + 1, record))
            i = skip_space(text, end)
            if text[i:i + 1] == ",":
                i = skip_space(text, i + 1)
            elif text[i:i + 1] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, i)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(path, getattr(e, "lineno", None), None, f"not valid UTF-8 JSON ({e})") from None
    return out


def skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


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
        if role == "assistant" and any(p in t[text_key] for p in PLACEHOLDERS.values()):
            raise ValueError("a media placeholder in an assistant reply (it would be trained as a label); "
                             "<image> and <audio> belong to user and system turns")
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
    if full.is_dir():
        raise ValueError(f"media path {full} is a folder; give a file")
    if not full.is_file():
        raise ValueError(f"media file {full} not found")
    return full


def encode_conversation(messages: list[dict], tok: Tokenizer, tokens_per_media: dict[str, int], max_len: int,
                        truncate: bool, add_generation_prompt: bool = False, blocks: dict[str, list[int]] | None = None
                        ) -> tuple[list[int], list[int], dict[str, int]]:
    """Render a conversation, expand each placeholder to K media tokens (times its medium's `blocks`, in the order
    of the placeholders: a long clip's windows) and build shifted labels: labels[t] is the target of position t
    (token t+1 when it belongs to an assistant reply, else -100).

    A sequence longer than `max_len` is an error unless `truncate`; truncation never cuts a block of media tokens
    (it cuts before the block). Returns ids, labels and the number of media blocks of each modality kept."""
    used = [m for m in MODALITIES if any(PLACEHOLDERS[m] in x["content"] for x in messages)]
    media_ids = {m: tok.media_token_id(m) for m in used}
    seen = dict.fromkeys(used, 0)

    def expand(m: str, text: str) -> str:  # each placeholder of `m` in turn, K tokens per block of its medium
        counts = (blocks or {}).get(m, [])
        parts = text.split(PLACEHOLDERS[m])
        out = parts[0]
        for part in parts[1:]:
            n = counts[seen[m]] if seen[m] < len(counts) else 1
            out += tok.backend.id_to_token(media_ids[m]) * (tokens_per_media[m] * n) + part
            seen[m] += 1
        return out
    msgs = []
    for x in messages:
        content = x["content"]
        for m in used:
            content = expand(m, content)
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
# Samples and batches: typed, with every tensor's shape and dtype


@dataclass
class Item:
    """One tokenized sample, as the dataset gives it to `collate`."""
    id: str
    input_ids: list[int]  # (T_i,)
    labels: list[int]  # (T_i,): labels[t] is the target of position t (token t+1), -100 where there is none
    media: dict[str, Media] = field(default_factory=dict)  # modality -> its media, slots within the sample
    skipped: list[dict] = field(default_factory=list)  # samples that failed to decode, and this one took their place


# ----------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Example:
    id: str
    line: int  # where the sample starts in its file
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[Path]]  # modality -> files, in order of their placeholders
    messages: list[dict]
    blocks: dict[str, list[int]] = field(default_factory=dict)  # audio -> windows of each file (K tokens each)


class ConversationDataset(torch.utils.data.Dataset):
    """A JSONL / JSON-list conversation file, tokenized and checked when built, so that a bad sample stops the run
    (`on_error="raise"`) or is left out and listed in `self.skipped` (`on_error="skip"`) before training starts.

    What only decoding finds (a medium that fails to decode or holds NaN/Inf) obeys `on_error` too, when the sample
    is read: "raise" stops with its file, line and id; "skip" gives the next sample in its place and lists the bad
    one in the item's `skipped`. With a feature cache (`feature_cache`, built for the aligner whose weights hash to
    `aligner_hash`), every sample must be in it with its media unchanged since it was built."""

    def __init__(self, path: str | Path, tok: Tokenizer, aligner_config: AlignerConfig,
                 tokens_per_media: dict[str, int], max_len: int, truncate: bool = False, on_error: str = "raise",
                 allow_outside_paths: bool = False, feature_cache: str | Path | None = None,
                 aligner_hash: str | None = None, max_audio_windows: int = 1):
        self.path, self.root = Path(path), Path(path).parent
        self.tok, self.aligner_config, self.tokens_per_media = tok, aligner_config, tokens_per_media
        self.max_len, self.truncate, self.allow_outside = max_len, truncate, allow_outside_paths
        self.on_error, self.max_audio_windows = on_error, max_audio_windows
        self.cache = FeatureCache(feature_cache, aligner_hash) if feature_cache else None
        self.examples, self.skipped = encode_file(self.path, on_error, self.encode)
        if self.cache is not None:
            check_unique_ids(self.path, self.examples, "the feature cache is keyed by sample id")

    def encode(self, line: int, record: dict, sid: str) -> Example:
        try:
            messages = to_messages(record)
            files = {}
            for m in MODALITIES:
                paths = media_paths(record, m)
                n = sum(x["content"].count(PLACEHOLDERS[m]) for x in messages)
                if n != len(paths):
                    raise ValueError(f"{n} {PLACEHOLDERS[m]} placeholders but {len(paths)} {m} files given")
                files[m] = [resolve_media(self.root, p, self.allow_outside) for p in paths]
                if self.cache is None and m == "image":
                    for f in files[m]:
                        try:
                            check_image(f)
                        except Exception as e:  # any decoder failure is this sample's error
                            raise ValueError(f"cannot decode image file {f}: {e}") from None
            if self.cache is not None:
                self.cache.check(sid, [f for m in MODALITIES for f in files[m]])
            blocks = {"audio": [self.windows(f) for f in files["audio"]]}  # also checks each clip's header
            ids, labels, counts = encode_conversation(messages, self.tok, self.tokens_per_media, self.max_len,
                                                      self.truncate, blocks=blocks)
        except ValueError as e:
            raise SampleError(self.path, line, sid, str(e)) from None
        if all(x == -100 for x in labels):
            raise SampleError(self.path, line, sid, "no supervised tokens (no assistant reply within data.max_len)")
        kept = {"image": counts.get("image", 0), "audio": 0}
        while sum(blocks["audio"][:kept["audio"]]) < counts.get("audio", 0):  # whole clips: windows -> files
            kept["audio"] += 1
        return Example(sid, line, ids, labels, {m: files[m][:kept[m]] for m in MODALITIES}, messages,
                       {"audio": blocks["audio"][:kept["audio"]]})

    def windows(self, path: Path) -> int:
        """A clip's windows, or a ValueError naming its duration if it has more than `max_audio_windows`."""
        c = self.aligner_config
        try:
            samples = audio_samples(path, c)
        except Exception as e:
            raise ValueError(f"cannot decode audio file {path}: {e}") from None
        n = audio_windows(samples, c)
        if n > self.max_audio_windows:
            raise ValueError(f"audio file {path} lasts {samples / c.sample_rate:.1f} s: {n} windows of "
                             f"{c.clip_seconds:g} s, more than data.max_audio_windows = {self.max_audio_windows}; "
                             "raise it, or cut the clip")
        return n

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Item:
        def decode(ex: Example) -> Item:
            counts = {"image": len(ex.media["image"]), "audio": sum(ex.blocks.get("audio", []))}
            return self.with_media(Item(ex.id, ex.input_ids, ex.labels), ex, counts)
        return decode_or_skip(self, i, decode)

    def with_media(self, item: Item, ex: Example, counts: dict[str, int]) -> Item:
        """Add the first `counts[m]` media blocks of each modality (images; a clip's windows), decoded or features
        from the cache, to `item`, with the positions of their placeholder tokens, so that the model never has to
        search the batch for them."""
        for m in MODALITIES:
            if not counts[m]:
                continue
            media_id = self.tok.media_token_id(m)
            slots = torch.tensor([t for t, x in enumerate(item.input_ids) if x == media_id], dtype=torch.long)
            if self.cache is not None:
                tokens, pooled = self.cache.get(ex.id, m, counts[m])
                item.media[m] = Media(slots, tokens=tokens, pooled=pooled)
            else:
                blocks = [self.load(m, f, ex) for f in ex.media[m]]
                item.media[m] = Media(slots, raw=(blocks[0] if len(blocks) == 1 else torch.cat(blocks))[:counts[m]])
        return item

    def prompt(self, i: int) -> tuple[Item, str] | None:
        """The sample up to its last user turn, ready for generation, and the last reply as the expected answer;
        None for a sample whose media fail to decode, with on_error = "skip"."""
        ex = self.examples[i]
        last = max(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
        ids, _, counts = encode_conversation(ex.messages[:last], self.tok, self.tokens_per_media, self.max_len,
                                             truncate=True, add_generation_prompt=True, blocks=ex.blocks)
        try:
            item = self.with_media(Item(ex.id, ids, [-100] * len(ids)), ex, {m: counts.get(m, 0) for m in MODALITIES})
        except SampleError:
            if self.on_error == "raise":
                raise
            return None
        return item, ex.messages[last]["content"]

    def load(self, modality: str, path: Path, ex: Example) -> torch.Tensor:
        """One medium as blocks for the aligner: an image (1, 3, S, S), a clip's windows (W, samples)."""
        c = self.aligner_config
        try:
            if modality == "image":
                return preprocess_image(load_image(path), c)[None]
            return preprocess_audio(load_audio(path, c.sample_rate), c)
        except Exception as e:
            raise SampleError(self.path, ex.line, ex.id, f"cannot decode {modality} file {path}: {e}") from None


def encode_file(path: Path, on_error: str, encode) -> tuple[list, list[dict]]:
    """`encode(line, record, sample_id)` of every record (a JSON object) of a data file: (examples, skipped). A
    bad record (a SampleError) stops with its file and line (on_error = "raise"), or is left out and listed
    (on_error = "skip")."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset file not found")
    examples, skipped = [], []
    for line, record in read_records(path):
        try:
            if isinstance(record, SampleError):  # a line that is not JSON
                raise record
            if not isinstance(record, dict):
                raise SampleError(path, line, None, f"a sample is a JSON object, got {type(record).__name__}")
            examples.append(encode(line, record, str(record.get("id", f"line{line}"))))
        except SampleError as e:
            if on_error == "raise":
                raise
            skipped.append({"file": e.file, "line": e.line, "id": e.sample_id, "reason": e.reason})
    if not examples:
        raise ValueError(f"{path}: no usable samples ({len(skipped)} skipped)")
    return examples, skipped


def length_batches(ds: ConversationDataset, todo: list[int], max_rows: int, max_tokens: int,
                   max_new_tokens: int) -> list[list[int]]:
    """The samples to answer, in batches of similar length: sorted longest first (the first batch shows the peak
    memory), each batch cut where it would pass `max_rows` rows or `max_tokens` cache slots (rows x (its longest
    sample + max_new_tokens)). Few shapes, little padding, and rows that end at about the same step."""
    order = sorted(todo, key=lambda i: -len(ds.examples[i].input_ids))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows, width = len(batches[-1]) + 1, len(ds.examples[batches[-1][0]].input_ids) + max_new_tokens
            if rows <= max_rows and rows * width <= max_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


class PromptParts(torch.utils.data.Dataset):
    """The batches cut in parts of at most `part_rows` samples, for a DataLoader whose workers decode the media off
    the main process, several workers on one batch. Part j: (its batch's number, the samples kept, their
    references, those whose media do not decode, the collated prompts or None)."""

    def __init__(self, ds: ConversationDataset, batches: list[list[int]], pad_id: int, part_rows: int):
        self.ds, self.pad_id = ds, pad_id
        self.parts = [(k, b[s:s + part_rows]) for k, b in enumerate(batches) for s in range(0, len(b), part_rows)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, j: int):
        k, samples = self.parts[j]
        kept, references, bad, items = [], [], [], []
        for i in samples:
            pair = self.ds.prompt(i)
            if pair is None:
                bad.append(i)
                continue
            kept.append(i)
            items.append(pair[0])
            references.append(pair[1])
        return k, kept, references, bad, collate(items, self.pad_id) if items else None


def prompt_batches(ds: ConversationDataset, todo: list[int], max_rows: int, max_tokens: int, max_new_tokens: int,
                   pad_id: int, device: torch.device, workers: int = 0, part_rows: int | None = None):
    """The samples `todo` as prompts to generate from, in `length_batches`: yields (the samples kept, their
    references, those whose media do not decode, the collated prompts on `device`, or None when none is left).
    With `workers`, DataLoader processes decode the media, each batch cut in parts of `part_rows` (default: one part
    a worker, 16 rows at least), so that the first batch is ready in the time of a part; the parts join on `device`
    (`concat_batches`). The workers start at this call, before the first batch is asked for: a caller may load its
    model meanwhile."""
    batches = length_batches(ds, todo, max_rows, max_tokens, max_new_tokens)
    part_rows = part_rows or (max(16, -(-max_rows // workers)) if workers else max_rows)
    parts = PromptParts(ds, batches, pad_id, part_rows)
    n_parts = [0] * len(batches)  # parts a batch
    for k, _ in parts.parts:
        n_parts[k] += 1
    # its own generator: an iterator draws a seed from it, which the caller's RNG must not give
    loader = torch.utils.data.DataLoader(parts, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", generator=torch.Generator())
    return joined_parts(iter(loader), n_parts, pad_id, device)  # iter(): the workers start now


def joined_parts(loader, n_parts: list[int], pad_id: int, device: torch.device):
    """`prompt_batches`' batches from its loader's parts, joined on `device`."""
    got: list = []
    for k, kept, references, bad, prompts in loader:
        got.append((kept, references, bad, None if prompts is None else prompts.to(device)))
        if len(got) == n_parts[k]:
            joined = [p for *_, p in got if p is not None]
            yield ([i for g in got for i in g[0]], [r for g in got for r in g[1]], [i for g in got for i in g[2]],
                   concat_batches(joined, pad_id) if joined else None)
            got = []


def check_unique_ids(path: Path, examples: list, why: str) -> None:
    """A ValueError naming the first sample whose id an earlier one has, and both lines, where ids key something
    (`why`): the feature cache, or the predictions that `generate.py --resume` skips. Elsewhere ids may repeat:
    skipped.jsonl names a sample by file and line. A sample without an id gets its line's (`line12`)."""
    first: dict[str, int] = {}
    for ex in examples:
        if ex.id in first:
            raise ValueError(f"{path}:{ex.line}: sample id {ex.id!r} is also the id of the sample on line "
                             f"{first[ex.id]}; {why}: give each sample its own id")
        first[ex.id] = ex.line


def decode_or_skip(ds, i: int, decode):
    """`decode(ds.examples[i])`; with `ds.on_error == "skip"`, the next example that decodes takes the place of one
    that does not, and the item's `skipped` lists those passed over."""
    skipped = []
    for j in range(i, i + len(ds.examples)):
        try:
            item = decode(ds.examples[j % len(ds.examples)])
        except SampleError as e:
            if ds.on_error == "raise":
                raise
            skipped.append({"file": e.file, "line": e.line, "id": e.sample_id, "reason": e.reason})
            continue
        item.skipped = skipped
        return item
    raise ValueError(f"{ds.path}: no sample decodes ({len(skipped)} skipped; the first: {skipped[0]['reason']})")


def write_skipped(path: str | Path, skipped: list[dict]) -> None:
    with open(path, "a") as f:
        for s in skipped:
            f.write(json.dumps(s) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Answers and progress, as evaluation and prediction report them


def normalize_answer(text: str) -> str:
    """What exact-match accuracy compares: the answer without surrounding space, in lower case."""
    return text.strip().lower()


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 5400 \
        else f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------------------------------------
# Collate: pad, or pack several samples into one row


def collate(items: list[Item], pad_id: int, pack: bool = False, max_len: int | None = None,
            pad_multiple: int = 1) -> Batch:
    """Stack samples into a batch.

    Padded (default): one row per sample, padded on the right; plain causal attention is then exact.
    Packed: samples fill rows of `max_len` tokens (first fit), each with its own positions from 0 and a
    `doc_ids` row, from which the model builds a mask with no attention across samples.
    Media are concatenated in the order their placeholders appear in the flattened batch. Rows are padded to a
    multiple of `pad_multiple` tokens, so that compiled layers see few distinct shapes."""
    if pack and max_len is None:
        raise ValueError("packing needs max_len")
    rows = first_fit([len(it.input_ids) for it in items], max_len) if pack else [[i] for i in range(len(items))]
    T = max(sum(len(items[i].input_ids) for i in row) for row in rows)
    T = -(-T // pad_multiple) * pad_multiple
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    sample_index = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    lengths = []
    order = []  # samples in the order of the flattened batch
    slots: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            it, n = items[i], len(items[i].input_ids)
            for m, x in it.media.items():
                slots[m].append(b * T + t + x.slots)
            input_ids[b, t:t + n] = torch.tensor(it.input_ids)
            labels[b, t:t + n] = torch.tensor(it.labels)
            sample_index[b, t:t + n] = i
            position_ids[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = i
            t += n
            order.append(i)
        lengths.append(t)
    label_index = (labels.flatten() != -100).nonzero()[:, 0]
    media = {}
    for m in MODALITIES:
        parts = [items[i].media[m] for i in order if m in items[i].media]
        if parts:
            def cat(name):
                return None if getattr(parts[0], name) is None else torch.cat([getattr(x, name) for x in parts])
            media[m] = Media(torch.cat(slots[m]), cat("raw"), cat("tokens"), cat("pooled"))
    modality = torch.tensor([[m in it.media for m in MODALITIES] for it in items], dtype=torch.bool)
    return Batch(input_ids, labels, label_index, torch.ones(len(label_index)), sample_index,
                 modality.view(len(items), len(MODALITIES)), lengths, [it.id for it in items], media,
                 position_ids if pack else None, doc_ids if pack else None, [s for it in items for s in it.skipped])


def first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Samples of these lengths packed in rows of `max_len` tokens: each in the first row with room for it."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(max_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def concat_batches(parts: list[Batch], pad_id: int) -> Batch:
    """Padded batches made one, as `collate` makes one of all their samples, on the parts' device: the rows padded
    to the widest part, the flat positions b*T+t of labels and placeholders renumbered for the new rows and width,
    and the media joined in their placeholders' order."""
    if any(p.doc_ids is not None for p in parts):
        raise ValueError("concat_batches joins padded batches; packed rows hold several samples a row")
    if len(parts) == 1:
        return parts[0]
    T = max(p.input_ids.shape[1] for p in parts)
    first = [0]  # each part's first row
    for p in parts:
        first.append(first[-1] + p.input_ids.shape[0])

    def widen(name: str, fill: int) -> torch.Tensor:
        return torch.cat([F.pad(getattr(p, name), (0, T - p.input_ids.shape[1]), value=fill) for p in parts])

    def renumber(flat: torch.Tensor, p: Batch, r0: int) -> torch.Tensor:  # b*t_p+t -> (r0+b)*T+t
        width = p.input_ids.shape[1]
        return (flat // width + r0) * T + flat % width

    rows = torch.arange(first[-1], device=parts[0].input_ids.device)[:, None]  # (B, 1): a padded row is a sample
    lengths = [n for p in parts for n in p.lengths]
    real = torch.arange(T, device=rows.device)[None, :] < torch.tensor(lengths, device=rows.device)[:, None]
    media = {}
    for m in MODALITIES:
        have = [(p, r0) for p, r0 in zip(parts, first) if m in p.media]
        if have:
            def cat(name):
                return None if getattr(have[0][0].media[m], name) is None else \
                    torch.cat([getattr(p.media[m], name) for p, _ in have])
            media[m] = Media(torch.cat([renumber(p.media[m].slots, p, r0) for p, r0 in have]), cat("raw"),
                             cat("tokens"), cat("pooled"))
    return Batch(widen("input_ids", pad_id), widen("labels", -100),
                 torch.cat([renumber(p.label_index, p, r0) for p, r0 in zip(parts, first)]),
                 torch.cat([p.label_weight for p in parts]), torch.where(real, rows, 0),
                 torch.cat([p.modality for p in parts]), lengths, [i for p in parts for i in p.ids], media,
                 skipped=[s for p in parts for s in p.skipped])


# ----------------------------------------------------------------------------------------------------------------
# Feature cache: the frozen aligner's outputs, computed once, in safetensors shards keyed by sample id


def media_stamp(path: Path) -> list[int]:
    """What tells that a medium changed since its features were cached: its size and modification time."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def build_feature_cache(dataset: ConversationDataset, aligner, folder: str | Path, device="cpu",
                        shard_samples: int = 1024, num_workers: int = 0) -> int:
    """Run the aligner over every sample's media and write `features-NNNNN.safetensors` + `index.json`, which
    records the aligner's weights hash and each medium's size and modification time, so that a cache that no
    longer fits is refused (`FeatureCache`). `num_workers` DataLoader processes decode the media. Returns the
    number of samples cached."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_unique_ids(dataset.path, dataset.examples, "the feature cache is keyed by sample id")
    files = {ex.id: [f for m in MODALITIES for f in ex.media[m]] for ex in dataset.examples}
    index, shard, n_shard = {}, {}, 0

    def flush():
        nonlocal shard, n_shard
        if shard:
            save_tensors(shard, folder / f"features-{n_shard:05d}.safetensors")
            n_shard, shard = n_shard + 1, {}

    samples = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)  # workers decode
    with torch.no_grad():
        for item in samples:
            item = getattr(item, "chosen", item)  # a preference pair's media are its chosen row's (and its rejected's)
            for m, media in item.media.items():
                tokens, pooled = getattr(aligner, m)(media.raw.to(device))
                shard[f"{item.id}/{m}/tokens"] = tokens.float()
                shard[f"{item.id}/{m}/pooled"] = pooled.float()
            index[item.id] = {"shard": f"features-{n_shard:05d}.safetensors",
                              "media": {str(f): media_stamp(f) for f in files[item.id]}}
            if len(index) % shard_samples == 0:
                flush()
    flush()
    (folder / "index.json").write_text(json.dumps({"aligner": asdict(aligner.config),
                                                   "aligner_hash": weights_hash(aligner), "samples": index}))
    return len(index)


REBUILD = "rebuild it: python train.py --config CONFIG --build_feature_cache"


class FeatureCache:
    """A feature cache folder, checked against the aligner (`aligner_hash`, when given) on opening and against each
    sample's media by `check`: features of other weights or of edited media are never used."""

    def __init__(self, folder: str | Path, aligner_hash: str | None = None):
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no feature cache here; build it with "
                                    "`python train.py --config CONFIG --build_feature_cache`")
        doc = json.loads(index.read_text())
        if "aligner_hash" not in doc:
            raise ValueError(f"{index}: the feature cache records no aligner weights hash (an older format); {REBUILD}")
        if aligner_hash is not None and doc["aligner_hash"] != aligner_hash:
            raise ValueError(f"{index}: the feature cache was built with other aligner weights (hash "
                             f"{doc['aligner_hash']}, the aligner now: {aligner_hash}); {REBUILD}")
        self.index = doc["samples"]
        self.handles = {}

    def check(self, sample_id: str, files: list[Path]) -> None:
        """A ValueError if the sample is not in the cache or one of its media changed since the cache was built."""
        entry = self.index.get(sample_id)
        if entry is None:
            raise ValueError(f"not in the feature cache {self.folder}; {REBUILD}")
        for f in files:
            if entry["media"].get(str(f)) != media_stamp(f):
                raise ValueError(f"{f} changed since the feature cache {self.folder} was built (size or "
                                 f"modification time); {REBUILD}")

    def get(self, sample_id: str, modality: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        shard = self.index[sample_id]["shard"]
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        h = self.handles[shard]
        key = f"{sample_id}/{modality}"
        return h.get_tensor(f"{key}/tokens")[:count], h.get_tensor(f"{key}/pooled")[:count]


# ----------------------------------------------------------------------------------------------------------------
# Phase-1 pairs: {"image": ..., "text": ...}, {"audio": ..., "text": ...}, {"image": ..., "audio": ...}

PAIR_KINDS = (("image", "text"), ("audio", "text"), ("image", "audio"))  # each kind's two sides, in this order


@dataclass
class PairExample:
    id: str
    line: int
    kind: int  # index into PAIR_KINDS
    files: dict[str, Path]  # "image" / "audio" -> its file
    text: str | None
    text_ids: list[int] | None  # the text's tokens (at most max_len)
    keys: tuple[str, str]  # what each side is (the text, or the medium's path; or the pair's "group"): pairs that
    # share one are right answers for each other in retrieval


@dataclass
class PairItem:
    """One decoded pair, as `collate_pairs` takes it."""
    id: str
    kind: int
    media: dict[str, torch.Tensor]  # "image": (3, S, S) float32, "audio": (samples,) float32, as the aligner takes
    text_ids: list[int] | None
    keys: tuple[str, str]  # as PairExample's
    skipped: list[dict] = field(default_factory=list)


@dataclass
class PairBatch:
    """B Phase-1 pairs. Each side of a pair is one row of the batch's embeddings, which the model stacks as
    [images; clips; texts]: `left` and `right` index that stack."""
    kind: torch.Tensor  # (B,) int64: index into PAIR_KINDS
    left: torch.Tensor  # (B,) int64: each pair's first side (image, audio or image), a row of the stack
    right: torch.Tensor  # (B,) int64: its second side (text, text or audio)
    media: dict[str, torch.Tensor]  # "image": (Ni, 3, S, S), "audio": (Na, samples) float32, those present
    text_ids: torch.Tensor | None  # (Nt, L) int64, right-padded
    text_lengths: torch.Tensor | None  # (Nt,) int64: tokens of each text
    ids: list[str]  # (B,)
    skipped: list[dict] = field(default_factory=list)

    def apply(self, fn) -> "PairBatch":
        def f(t):
            return None if t is None else fn(t)
        return replace(self, kind=fn(self.kind), left=fn(self.left), right=fn(self.right),
                       media={m: fn(x) for m, x in self.media.items()}, text_ids=f(self.text_ids),
                       text_lengths=f(self.text_lengths))

    def to(self, device: torch.device | str) -> "PairBatch":
        return self.apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "PairBatch":
        return self.apply(lambda t: t.pin_memory())

    def count(self) -> torch.Tensor:
        """What the loss is averaged over: the pairs. () float32."""
        return torch.ones_like(self.kind, dtype=torch.float32).sum()

    def groups(self) -> torch.Tensor:
        """(3, B) bool: the pairs of each kind (GROUPS["align"]), for the loss of each."""
        return kind_groups(self.kind)


def kind_groups(kind: torch.Tensor) -> torch.Tensor:
    """Pair kinds (N,) -> (len(PAIR_KINDS), N) bool: which pairs are of each kind."""
    return kind[None] == torch.arange(len(PAIR_KINDS), device=kind.device)[:, None]


class PairDataset(torch.utils.data.Dataset):
    """A Phase-1 pair file (JSONL or JSON list), checked when built as `ConversationDataset` is: each record holds
    exactly two of "image", "audio", "text" (paths relative to the file), and a bad one obeys `on_error`. A clip
    gives the aligner its first window; a text is cut to `max_len` tokens. An optional "group" names pairs that
    are right answers for each other in retrieval (an image and a clip of the same count); without it, pairs are
    when they share a side (two images with one caption)."""

    def __init__(self, path: str | Path, tok: Tokenizer, aligner_config: AlignerConfig, max_len: int,
                 on_error: str = "raise", allow_outside_paths: bool = False):
        self.path, self.root = Path(path), Path(path).parent
        self.tok, self.aligner_config, self.max_len = tok, aligner_config, max_len
        self.on_error, self.allow_outside = on_error, allow_outside_paths
        self.examples, self.skipped = encode_file(self.path, on_error, self.encode)

    def encode(self, line: int, record: dict, sid: str) -> PairExample:
        try:
            sides = tuple(k for k in ("image", "audio", "text") if k in record)
            if sides not in PAIR_KINDS:
                raise ValueError(f"a pair holds exactly two of image, audio, text (image+text, audio+text or "
                                 f"image+audio); this one has {', '.join(sides) or 'none'}")
            files = {}
            for m in sides:
                if not isinstance(record[m], str) or (m == "text" and not record[m].strip()):
                    raise ValueError(f"'{m}' must be a {'non-empty text' if m == 'text' else 'path'}")
                if m != "text":
                    files[m] = f = resolve_media(self.root, record[m], self.allow_outside)
                    try:
                        check_image(f) if m == "image" else audio_samples(f, self.aligner_config)
                    except Exception as e:
                        raise ValueError(f"cannot decode {m} file {f}: {e}") from None
            text_ids = self.tok.encode(record["text"])[:self.max_len] if "text" in record else None
        except ValueError as e:
            raise SampleError(self.path, line, sid, str(e)) from None
        group = record.get("group")
        keys = (f"group {group}",) * 2 if group is not None else \
            tuple(record[m] if m == "text" else str(files[m]) for m in sides)
        return PairExample(sid, line, PAIR_KINDS.index(sides), files, record.get("text"), text_ids, keys)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PairItem:
        return decode_or_skip(self, i, self.decode)

    def decode(self, ex: PairExample) -> PairItem:
        c = self.aligner_config
        media = {}
        for m, path in ex.files.items():
            try:
                media[m] = preprocess_image(load_image(path), c) if m == "image" else \
                    preprocess_audio(load_audio(path, c.sample_rate), c)[0]
            except Exception as e:
                raise SampleError(self.path, ex.line, ex.id, f"cannot decode {m} file {path}: {e}") from None
        return PairItem(ex.id, ex.kind, media, ex.text_ids, ex.keys)


def collate_pairs(items: list[PairItem], pad_id: int) -> PairBatch:
    """Stack pairs: their images, clips and texts (right-padded) each in batch order, and where each pair's sides
    sit in the model's stack of embeddings [images; clips; texts]."""
    rows: dict[str, list[int]] = {"image": [], "audio": [], "text": []}  # modality -> the pairs that have it
    for i, it in enumerate(items):
        for m in PAIR_KINDS[it.kind]:
            rows[m].append(i)
    first = {"image": 0, "audio": len(rows["image"]), "text": len(rows["image"]) + len(rows["audio"])}
    row_of = {(m, i): first[m] + r for m in rows for r, i in enumerate(rows[m])}
    left = torch.tensor([row_of[PAIR_KINDS[it.kind][0], i] for i, it in enumerate(items)])
    right = torch.tensor([row_of[PAIR_KINDS[it.kind][1], i] for i, it in enumerate(items)])
    media = {m: torch.stack([items[i].media[m] for i in rows[m]]) for m in MODALITIES if rows[m]}
    text_ids = text_lengths = None
    if rows["text"]:
        texts = [items[i].text_ids for i in rows["text"]]
        text_lengths = torch.tensor([len(t) for t in texts])
        text_ids = torch.full((len(texts), int(text_lengths.max())), pad_id, dtype=torch.long)
        for r, t in enumerate(texts):
            text_ids[r, :len(t)] = torch.tensor(t)
    return PairBatch(torch.tensor([it.kind for it in items]), left, right, media, text_ids, text_lengths,
                     [it.id for it in items], [s for it in items for s in it.skipped])

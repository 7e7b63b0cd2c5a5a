"""The frozen encoders in front of the projectors: the Phase-1 aligner (our own small image and audio
encoders with heads into one aligned space of dimension D) and the Hugging Face towers it may use instead
(CLIP / SigLIP vision, Whisper audio), with their preprocessing.

    aligner = load_aligner("runs/demo/aligner")        # every parameter frozen
    tokens, pooled = aligner.image(pixels)              # (B, N, D), (B, D)
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import (SkipRandomInit, check_tensors, load_state_streaming, open_safetensors, read_json, read_safetensors,
                     safetensors_files, save_tensors, set_tensor, skeleton, write_json)


# ----------------------------------------------------------------------------------------------------------------
# Phase-1 aligner: image and audio encoders whose heads share one aligned space of dimension D


@dataclass
class EncoderConfig:
    width: int = 128  # our own encoder's shape (unused with `hf`)
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    hf: str = ""  # a Hugging Face folder used as this encoder instead: CLIP / SigLIP (image), Whisper (audio)
    layer: int = -1  # with `hf`, an image tower's hidden state to use (-2: LLaVA's choice)


@dataclass
class AlignerConfig:
    """The architecture of a Phase-1 aligner, as `aligner.json` stores it."""
    dim: int = 128  # D, the aligned dimension
    image: EncoderConfig = field(default_factory=EncoderConfig)
    audio: EncoderConfig = field(default_factory=EncoderConfig)
    image_size: int = 32
    patch_size: int = 8
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    sample_rate: int = 16000
    clip_seconds: float = 1.0  # audio is cut or zero-padded to this length
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40

    def __post_init__(self):
        if self.audio.hf:  # Whisper hears 30-second windows at 16 kHz
            self.sample_rate, self.clip_seconds = 16000, 30.0

    @classmethod
    def from_dict(cls, d: dict) -> "AlignerConfig":
        d = dict(d)
        for m in ("image", "audio"):
            d[m] = EncoderConfig(**d.get(m, {}))
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_audio_tokens(self) -> int:
        frames = int(self.sample_rate * self.clip_seconds) // self.hop_length + 1
        return (frames + 1) // 2  # the stem's stride-2 convolution


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (bidirectional attention) shared by both encoders."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c.width, hidden), nn.GELU(), nn.Linear(hidden, c.width))

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, W/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, W))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """ViT: patch convolution, class token, learned positions, pre-LN blocks, final LayerNorm."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        c = cfg.image
        self.patch_embed = nn.Conv2d(3, c.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, c.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B, 1+N, W)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:], x[:, 0]  # tokens (B, N, W), pooled (B, W)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, scale: str = "htk") -> torch.Tensor:
    """Triangular mel filters (n_freqs, n_mels) over the one-sided STFT bins: on the HTK mel scale, or "slaney":
    Slaney's scale (linear below 1 kHz, logarithmic above) with area-normalised filters, as librosa and Whisper."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    if scale == "htk":
        mels = torch.linspace(0, 2595.0 * math.log10(1.0 + sample_rate / 2 / 700.0), n_mels + 2)
        hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    else:
        top = sample_rate / 2
        top = top * 3.0 / 200.0 if top < 1000.0 else 15.0 + math.log(top / 1000.0) * 27.0 / math.log(6.4)
        mels = torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64)
        hz = torch.where(mels < 15.0, mels * 200.0 / 3.0, 1000.0 * torch.exp((mels - 15.0) * math.log(6.4) / 27.0))
        freqs = freqs.double()
    lower, center, upper = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lower) / (center - lower)
    down = (upper - freqs[:, None]) / (upper - center)
    filters = torch.clamp(torch.minimum(up, down), min=0.0)
    if scale != "htk":
        filters = filters * (2.0 / (upper - lower))
    return filters.float()


class AudioEncoder(nn.Module):
    """Log-mel features (computed in torch), a strided convolution stem, sinusoidal positions, pre-LN blocks."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        c = cfg.audio
        self.n_fft, self.hop_length = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("mel_filters", mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate), persistent=False)
        self.conv1 = nn.Conv1d(cfg.n_mels, c.width, 3, padding=1)
        self.conv2 = nn.Conv1d(c.width, c.width, 3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(cfg.num_audio_tokens, c.width), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = spec.abs() ** 2  # (B, n_freqs, frames)
        mel = self.mel_filters.T @ power  # (B, n_mels, frames)
        return torch.log10(mel.clamp(min=1e-10))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.log_mel(wave).to(self.conv1.weight.dtype)  # (B, n_mels, frames)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)  # (B, N, W)
        x = x + self.positions[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, x.mean(1)  # tokens (B, N, W), pooled (B, W)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Fixed sinusoidal positions (Vaswani et al., arXiv 1706.03762). (length, channels)."""
    inv = torch.exp(-math.log(10000.0) * torch.arange(channels // 2) / max(channels // 2 - 1, 1))
    t = torch.arange(length)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1)


class ModalityTower(nn.Module):
    """One modality's encoder and its head into the aligned space."""

    def __init__(self, encoder: nn.Module, width: int, dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = self.encoder(x)
        return self.head(tokens), F.normalize(self.head(pooled), dim=-1)  # (B, N, D), (B, D)


class Aligner(nn.Module):
    """The frozen Phase-1 aligner: `aligner.image(pixels)` / `aligner.audio(wave)` -> (tokens (B,N,D), pooled (B,D))."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.config = cfg
        for m, ours in (("image", ImageEncoder), ("audio", AudioEncoder)):
            c = getattr(cfg, m)
            encoder = TowerEncoder(c.hf, c.layer, m, cfg.n_mels) if c.hf else ours(cfg)
            setattr(self, m, ModalityTower(encoder, encoder.width if c.hf else c.width, cfg.dim))

    def train(self, mode: bool = True) -> "Aligner":
        return super().train(False)  # frozen: always in eval mode

    def tower_keys(self) -> set[str]:
        """The state of Hugging Face towers, which stays in their folders (aligner.safetensors holds the rest)."""
        return {k for k in self.state_dict() if ".encoder.tower." in k}


def aligner_folder(path: str | os.PathLike) -> Path:
    """A Phase-1 aligner folder, given as itself or as the Phase-1 run's folder that holds it in `aligner/`."""
    folder = Path(path)
    if not (folder / "aligner.json").is_file() and (folder / "aligner" / "aligner.json").is_file():
        return folder / "aligner"
    return folder


def aligner_config(path: str | os.PathLike) -> AlignerConfig:
    """The config of a Phase-1 aligner folder (its aligner.json), or of a Phase-1 run's `aligner/`."""
    return AlignerConfig.from_dict(read_json(aligner_folder(path) / "aligner.json",
                                             "a Phase-1 aligner folder needs aligner.json"))


def load_aligner(path: str | os.PathLike, device="cpu", init_missing: bool = False) -> Aligner:
    """Read a Phase-1 aligner folder (aligner.json + aligner.safetensors), or a Phase-1 run's folder (its
    `aligner/`); returned frozen and in eval mode. With `init_missing` (the start of Phase 1), a folder holding
    aligner.json alone gives a freshly initialised aligner (Hugging Face towers still load from their folders)."""
    folder = aligner_folder(path)
    cfg = aligner_config(folder)
    weights = folder / "aligner.safetensors"
    if not weights.is_file() and not init_missing:
        raise FileNotFoundError(f"{weights}: not found; a Phase-1 aligner folder needs aligner.safetensors")
    # small next to the LLM: built in place, then overwritten by every tensor of the file (no random init for that)
    with SkipRandomInit() if weights.is_file() else contextlib.nullcontext():
        aligner = Aligner(cfg).to(device)
    if weights.is_file():
        load_state_streaming(aligner, [weights], device, torch.float32, skip=tuple(aligner.tower_keys()))
    aligner.requires_grad_(False)
    return aligner.eval()


def save_aligner(aligner: Aligner, folder: str | os.PathLike) -> None:
    """Write a Phase-1 aligner folder: aligner.json (its architecture) and aligner.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "aligner.json", asdict(aligner.config))
    towers = aligner.tower_keys()
    save_tensors({k: v for k, v in aligner.state_dict().items() if k not in towers}, folder / "aligner.safetensors")


def copy_aligner(source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Copy a Phase-1 aligner folder (`aligner_folder(source)`) to `folder` as it is on disk, without building the
    aligner: Hugging Face towers' weights stay in their own folders, which aligner.json names."""
    source, folder = aligner_folder(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = read_json(source / "aligner.json", "a Phase-1 aligner folder needs aligner.json")
    write_json(folder / "aligner.json", doc)
    save_tensors(read_safetensors(source / "aligner.safetensors"), folder / "aligner.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face towers: CLIP / SigLIP vision and Whisper audio encoders, read from their folders, with their
# preprocessing (Hugging Face names throughout, so weights load by plain copy)


class TowerAttention(nn.Module):
    """Bidirectional multi-head attention with q/k/v/out projections (CLIP, SigLIP, Whisper's encoder)."""

    def __init__(self, width: int, heads: int, k_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=k_bias)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = (p(x).view(B, N, self.heads, W // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, N, W/heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, W))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:  # CLIP's activation
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class TowerMLP(nn.Module):
    def __init__(self, width: int, inner: int, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, inner), nn.Linear(inner, width), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """A pre-LN encoder layer of CLIP / SigLIP's vision transformer."""

    def __init__(self, c: dict):
        super().__init__()
        W, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-5)
        self.layer_norm1 = nn.LayerNorm(W, eps=eps)
        self.self_attn = TowerAttention(W, c["num_attention_heads"])
        self.layer_norm2 = nn.LayerNorm(W, eps=eps)
        self.mlp = TowerMLP(W, c["intermediate_size"], ACTIVATIONS[c.get("hidden_act", "quick_gelu")])

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """CLIP's or SigLIP's vision transformer: `tower(pixel_values (B, 3, S, S)) -> (B, N, width)`, transformers'
    `hidden_states[layer]` (CLIP's N counts its class token first; SigLIP has none). For the last layer SigLIP's
    post-layernorm is applied, as its `last_hidden_state` is; CLIP's `last_hidden_state` has none."""

    def __init__(self, c: dict, family: str, layer: int = -1):
        super().__init__()
        W, P, S = c["hidden_size"], c["patch_size"], c["image_size"]
        self.family, self.layer, self.image_size = family, layer, S
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, W, P, stride=P, bias=family == "siglip")
        n = (S // P) ** 2 + (family == "clip")
        self.embeddings.position_embedding = nn.Embedding(n, W)
        if family == "clip":
            self.embeddings.class_embedding = nn.Parameter(torch.zeros(W))
            self.pre_layrnorm = nn.LayerNorm(W, eps=c.get("layer_norm_eps", 1e-5))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(c) for _ in range(c["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(W, eps=c.get("layer_norm_eps", 1e-5))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.patch_embedding(pixels.to(e.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        if self.family == "clip":
            x = torch.cat([e.class_embedding.expand(x.shape[0], 1, -1), x], 1)  # (B, 1 + N, W)
        x = x + e.position_embedding.weight
        if self.family == "clip":
            x = self.pre_layrnorm(x)
        layers = self.encoder.layers
        stop = self.layer % (len(layers) + 1)  # hidden_states[i] is the output of the first i layers
        for layer in layers[:stop]:
            x = layer(x)
        return self.post_layernorm(x) if self.family == "siglip" and stop == len(layers) else x


class WhisperLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        W = c["d_model"]
        self.self_attn_layer_norm = nn.LayerNorm(W)
        self.self_attn = TowerAttention(W, c["encoder_attention_heads"], k_bias=False)
        self.final_layer_norm = nn.LayerNorm(W)
        self.fc1 = nn.Linear(W, c["encoder_ffn_dim"])
        self.fc2 = nn.Linear(c["encoder_ffn_dim"], W)
        self.act = ACTIVATIONS[c.get("activation_function", "gelu")]

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperTower(nn.Module):
    """Whisper's encoder: `tower(input_features (B, n_mels, 3000)) -> (B, 1500, d_model)`, transformers'
    `WhisperEncoder` last_hidden_state."""

    def __init__(self, c: dict):
        super().__init__()
        W = c["d_model"]
        self.conv1 = nn.Conv1d(c["num_mel_bins"], W, 3, padding=1)
        self.conv2 = nn.Conv1d(W, W, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c["max_source_positions"], W)
        self.layers = nn.ModuleList(WhisperLayer(c) for _ in range(c["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(W)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))  # (B, W, 3000)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, 1500, W)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# transformers' defaults for keys a config.json may leave out (google/siglip2-* folders give only a few keys)
TOWER_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "whisper": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
                    max_source_positions=1500, activation_function="gelu"),
}


def tower_weights(folder: Path, anchor: str) -> tuple[list[Path], str, dict[str, tuple]]:
    """The weight files of a Hugging Face folder, the prefix of the tower's keys in them (found from `anchor`, a
    key suffix only the tower has: `CLIPModel` and `CLIPVisionModel` name it differently) and the tower's keys
    with their shapes, read from the headers only."""
    files = safetensors_files(folder)
    shapes = {}
    for f in files:
        with open_safetensors(f) as sf:
            shapes |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    prefix = next((k[: -len(anchor)] for k in sorted(shapes) if k.endswith(anchor)), None)
    if prefix is None:
        raise ValueError(f"{folder}: no tensor named *{anchor}; is it a CLIP / SigLIP / Whisper folder?")
    return files, prefix, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def load_tower(module: nn.Module, folder: Path, anchor: str, device, dtype, ignore: tuple[str, ...] = ()) -> None:
    """Copy the tower's tensors (only those: a Whisper decoder or a CLIP text model is never read) into `module`,
    after checking every key and shape."""
    files, prefix, found = tower_weights(folder, anchor)
    found = {k: v for k, v in found.items() if not k.startswith(ignore)}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_tensors(expected, found, f"{folder}: the tower's weights (keys {prefix}*) do not fit its config.json")
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                name = key[len(prefix):]
                if key.startswith(prefix) and name in expected:
                    set_tensor(module, name, sf.get_tensor(key).to(device=device, dtype=dtype))


def load_vision_tower(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, layer: int = -1
                      ) -> VisionTower:
    """A CLIP (`CLIPVisionModel`, or the vision part of a `CLIPModel` folder) or SigLIP (`SiglipVisionModel`,
    `SiglipModel`) vision tower from a Hugging Face folder, single or sharded safetensors; frozen, in eval mode.
    `layer` picks the hidden state it returns (-2, the one before the last, is what LLaVA feeds its projector)."""
    folder = Path(path)
    cfg = read_json(folder / "config.json", "a Hugging Face model folder needs config.json")
    family = VISION_TYPES.get(cfg.get("model_type"))
    if family is None:
        raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a supported vision "
                         f"tower; supported: {', '.join(VISION_TYPES)}")
    c = {**TOWER_DEFAULTS[family], **cfg.get("vision_config", cfg)}
    with skeleton():
        tower = VisionTower(c, family, layer)
    load_tower(tower, folder, "embeddings.patch_embedding.weight", device or "cpu", dtype,
               ignore=("head.", "embeddings.position_ids"))
    return tower.requires_grad_(False).eval()


def load_audio_tower(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> WhisperTower:
    """Whisper's encoder from a `WhisperModel` / `WhisperForConditionalGeneration` folder (the decoder's weights
    are not read); frozen, in eval mode."""
    folder = Path(path)
    cfg = read_json(folder / "config.json", "a Hugging Face model folder needs config.json")
    if cfg.get("model_type") != "whisper":
        raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a supported audio "
                         "tower; supported: whisper")
    with skeleton():
        tower = WhisperTower({**TOWER_DEFAULTS["whisper"], **cfg})
    load_tower(tower, folder, "conv1.weight", device or "cpu", dtype)
    return tower.requires_grad_(False).eval()


class TowerEncoder(nn.Module):
    """A Hugging Face tower as one of the aligner's encoders, frozen: (tokens (B, N, width), pooled (B, width)) in
    fp32. Image towers give their patch tokens (CLIP's class token is dropped, as LLaVA does); Whisper takes
    16 kHz waveforms (B, 480000) and computes their log-mel first. Pooled is the tokens' mean."""

    def __init__(self, path: str, layer: int, modality: str, n_mels: int):
        super().__init__()
        self.modality = modality
        self.tower = load_vision_tower(path, layer=layer) if modality == "image" else load_audio_tower(path)
        self.width = self.tower.post_layernorm.normalized_shape[0] if modality == "image" else \
            self.tower.layer_norm.normalized_shape[0]
        if modality == "audio":
            filters = mel_filterbank(400, self.tower.conv1.in_channels, 16000, "slaney")
            self.register_buffer("mel_filters", filters, persistent=False)  # (n_freqs, n_mels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.modality == "audio":
            x = whisper_log_mel(x, self.mel_filters.shape[1], filters=self.mel_filters)  # (B, n_mels, 3000)
        tokens = self.tower(x).float()  # (B, N, width)
        if self.modality == "image" and self.tower.family == "clip":
            tokens = tokens[:, 1:]
        return tokens, tokens.mean(1)


@lru_cache(maxsize=8)
def image_processor(path: str | os.PathLike):
    """The folder's `preprocessor_config.json` as a function: uint8 (3, H, W) -> float (3, S, S), resized (bicubic:
    the shortest edge, or to a fixed size), centre-cropped, rescaled and normalised as CLIPImageProcessor and
    SiglipImageProcessor do, in torch."""
    p = read_json(Path(path) / "preprocessor_config.json", "an image tower's folder needs preprocessor_config.json")
    size = p.get("size", {})
    crop = p.get("crop_size", {}) if p.get("do_center_crop", False) else {}
    mean = torch.tensor(p.get("image_mean", (0.5, 0.5, 0.5))).view(3, 1, 1)
    std = torch.tensor(p.get("image_std", (0.5, 0.5, 0.5))).view(3, 1, 1)

    def process(image: torch.Tensor) -> torch.Tensor:
        x = image.float()[None]  # (1, 3, H, W), 0..255
        H, W = x.shape[-2:]
        if p.get("do_resize", True):
            if "shortest_edge" in size:
                s = size["shortest_edge"]
                out = (s, int(s * W / H)) if H <= W else (int(s * H / W), s)
            else:
                out = (size["height"], size["width"])
            for hw in ((H, out[1]), out):  # width, then height, each pass rounded to 8 bits, as Pillow resamples
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).round()
        if crop:
            top, left = (x.shape[-2] - crop["height"]) // 2, (x.shape[-1] - crop["width"]) // 2
            x = x[..., top:top + crop["height"], left:left + crop["width"]]
        if p.get("do_rescale", True):
            x = x * p.get("rescale_factor", 1 / 255)
        return ((x[0] - mean) / std) if p.get("do_normalize", True) else x[0]
    return process


def whisper_log_mel(wave: torch.Tensor, n_mels: int = 80, sample_rate: int = 16000, n_fft: int = 400,
                    hop_length: int = 160, seconds: int = 30, filters: torch.Tensor | None = None) -> torch.Tensor:
    """WhisperFeatureExtractor in torch: (num_samples,) or (B, num_samples) at 16 kHz, cut or zero-padded to 30 s
    -> log-mel (..., n_mels, 3000) on Slaney's scale, floored 8 (log10 units) below each clip's maximum and scaled
    to about [-1, 1]. `filters` (n_freqs, n_mels), on the wave's device, saves computing them on each call."""
    n = seconds * sample_rate
    wave = F.pad(wave[..., :n].float(), (0, max(0, n - wave.shape[-1])))
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave, n_fft, hop_length, window=window, return_complex=True)
    power = spec[..., :-1].abs() ** 2  # (..., n_freqs, 3000)
    filters = mel_filterbank(n_fft, n_mels, sample_rate, "slaney").to(wave.device) if filters is None else filters
    mel = (filters.T @ power).clamp(min=1e-10).log10()  # (..., n_mels, 3000)
    return (torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0) + 4.0) / 4.0



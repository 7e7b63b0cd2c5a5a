"""Media decoding and preprocessing, with the standard library, numpy and torch only: WAV (PCM and float, any
header, channels and rate) and `.npy` waveforms to float32 mono resampled to the aligner's rate; PNG / JPEG (via
Pillow) and `.npy` images to uint8 (3, H, W); then the aligner's resizing, normalising and audio windows. Every
failure is a ValueError that names the file and says what is supported.

    wave = load_audio("clip.wav", sample_rate=16000)      # (num_samples,) float32 in [-1, 1]
    image = load_image("cat.png")                          # (3, H, W) uint8
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encoders import AlignerConfig, image_processor

def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Decode a WAV (PCM 8/16/24/32-bit or float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE header, any channels,
    any rate) or `.npy` waveform (integers scaled by their type's range, floats as they are) to float32 mono in
    [-1, 1], resampled to `sample_rate`. Returns (num_samples,). Any undecodable file, or one holding NaN or Inf or
    float samples beyond 2 in magnitude, is a ValueError naming it."""
    path = Path(path)
    try:
        x, rate = read_npy_audio(path, sample_rate) if path.suffix.lower() == ".npy" else read_wav(path)
        peak = float(np.abs(x).max(initial=0.0))  # NaN where a sample is NaN
        if not np.isfinite(peak):
            raise ValueError("it holds NaN or Inf values")
        if peak > 2.0:  # float samples lie in [-1, 1]; far beyond, the encoder's features overflow
            raise ValueError(f"its samples reach {peak:.3g}, far outside [-1, 1]: normalise the clip")
    except Exception as e:
        raise ValueError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    return resample(torch.from_numpy(np.ascontiguousarray(x)), rate, sample_rate)


def int_to_float(x: np.ndarray) -> np.ndarray:
    """Integer samples or pixels to float32 in [-1, 1) (signed) or [0, 1] (unsigned 8/16-bit: pixels, 8-bit
    audio is shifted by the caller); floats as they are."""
    if x.dtype.kind == "f":
        return x.astype(np.float32)
    if x.dtype.kind == "i":
        return x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    if x.dtype.kind == "u":
        return x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize) - 1)
    raise ValueError(f"dtype {x.dtype} is not a number type")


NPY_AUDIO_DTYPES = ("int16", "int32", "uint8", "float32", "float64")
NPY_IMAGE_DTYPES = ("uint8", "uint16")


def check_npy(path: Path, modality: str) -> np.ndarray:
    """Open a `.npy` (memory-mapped: the header is read, not the data) and check its shape and dtype."""
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    if modality == "audio":
        if x.dtype.name not in NPY_AUDIO_DTYPES or x.ndim not in (1, 2):
            raise ValueError(f"an audio .npy holds (num_samples,) or (channels, num_samples) of "
                             f"{', '.join(NPY_AUDIO_DTYPES)}; got {x.dtype} {x.shape}")
    elif x.dtype.name not in NPY_IMAGE_DTYPES or x.ndim != 3 or not ({x.shape[0], x.shape[-1]} & {3, 4}):
        raise ValueError(f"an image .npy holds (H, W, 3|4) or (3|4, H, W) of {' or '.join(NPY_IMAGE_DTYPES)} "
                         f"(alpha is dropped); got {x.dtype} {x.shape}")
    return x


def read_npy_audio(path: Path, rate: int) -> tuple[np.ndarray, int]:
    x = np.asarray(check_npy(path, "audio"))
    x = (x.astype(np.float32) - 128.0) / 128.0 if x.dtype == np.uint8 else int_to_float(x)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] < x.shape[1] else 1)
    return x, rate


WAV_PCM, WAV_FLOAT, WAV_EXTENSIBLE = 1, 3, 0xFFFE


@dataclass
class WavInfo:
    format: int  # WAV_PCM or WAV_FLOAT (an extensible header's sub-format)
    channels: int
    rate: int
    bits: int
    data_offset: int
    data_bytes: int


def wav_info(path: Path) -> WavInfo:
    """Read a WAV's RIFF header and check it against the file: a supported format, a data chunk that the file
    holds whole. Python's `wave` reads PCM only and no extensible header (what sox and ffmpeg write for 24-bit or
    multichannel audio), so the chunks are walked here."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError("no 'data' chunk" if fmt else "no 'fmt ' chunk")
            name, n = chunk[:4], int.from_bytes(chunk[4:], "little")
            if name == b"fmt ":
                body = f.read(n)
                if len(body) < 16:
                    raise ValueError("'fmt ' chunk too short")
                tag, channels, rate = (int.from_bytes(body[i:j], "little") for i, j in ((0, 2), (2, 4), (4, 8)))
                bits = int.from_bytes(body[14:16], "little")
                if tag == WAV_EXTENSIBLE and len(body) >= 26:
                    tag = int.from_bytes(body[24:26], "little")  # the sub-format GUID starts with the format tag
                fmt = (tag, channels, rate, bits)
            elif name == b"data":
                if fmt is None:
                    raise ValueError("'data' chunk before the 'fmt ' chunk")
                info = WavInfo(*fmt, data_offset=f.tell(), data_bytes=n)
                break
            else:
                f.seek(n + (n & 1), 1)  # chunks are padded to even sizes
    supported = {WAV_PCM: (8, 16, 24, 32), WAV_FLOAT: (32, 64)}
    if info.bits not in supported.get(info.format, ()):
        kind = {WAV_PCM: "PCM", WAV_FLOAT: "float"}.get(info.format, f"format {info.format}")
        raise ValueError(f"{kind} {info.bits}-bit WAV is not supported; supported: PCM 8/16/24/32-bit and float "
                         "32/64-bit (plain or extensible header)")
    if info.channels < 1 or info.rate < 1:
        raise ValueError(f"malformed WAV header ({info.channels} channels, rate {info.rate})")
    frame = info.channels * info.bits // 8
    if info.data_offset + info.data_bytes > size or info.data_bytes % frame:
        raise ValueError(f"the header promises {info.data_bytes} bytes of audio data, in frames of {frame}, and the "
                         f"file holds {size - info.data_offset}: it is truncated or malformed")
    if info.data_bytes == 0:
        raise ValueError("no audio samples (the data chunk is empty)")
    return info


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples as float32 mono in [-1, 1], and the file's rate."""
    info = wav_info(path)
    with open(path, "rb") as f:
        f.seek(info.data_offset)
        raw = f.read(info.data_bytes)
    if info.format == WAV_FLOAT:
        x = np.frombuffer(raw, "<f4" if info.bits == 32 else "<f8").astype(np.float32)
    elif info.bits == 8:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif info.bits == 24:  # sign-extend three little-endian bytes into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = int_to_float(np.frombuffer(raw, {16: "<i2", 32: "<i4"}[info.bits]))
    return x.reshape(-1, info.channels).mean(axis=1), info.rate


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
    """Decode `.npy` (H, W, 3|4) or (3|4, H, W) of uint8 or uint16, or PNG/JPEG through Pillow (8- or 16-bit, grey
    or colour), to a uint8 tensor (3, H, W); 16-bit values are scaled to 8 bits, alpha is dropped. Any undecodable
    file is a ValueError naming it; PNG/JPEG without Pillow is an ImportError saying what to do."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(f"{path}: decoding PNG/JPEG needs Pillow: `pip install pillow`, or store images as "
                              ".npy uint8 arrays") from None
    try:
        if path.suffix.lower() == ".npy":
            x = np.asarray(check_npy(path, "image"))
            if x.shape[-1] in (3, 4) and x.shape[0] not in (3, 4):
                x = x.transpose(2, 0, 1)  # (C, H, W)
            x = x[:3]
        else:
            with Image.open(path) as im:
                if im.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" holding 16-bit values)
                    x = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[None].repeat(3, 0)
                elif im.mode == "F":
                    raise ValueError("floating-point images are not supported; use 8- or 16-bit")
                else:
                    x = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        if x.dtype == np.uint16:
            x = np.round(x.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(x))
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def preprocess_image(image: torch.Tensor, cfg: AlignerConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, S, S): resized to the aligner's `image_size`, normalised with its mean/std; for a
    Hugging Face tower, as its folder's preprocessor_config.json says."""
    if cfg.image.hf:
        return image_processor(cfg.image.hf)(image)
    x = image[None].float().div_(255.0)
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)[0]


def audio_windows(samples: int, cfg: AlignerConfig) -> int:
    """How many windows of the aligner's `clip_seconds` a clip of `samples` (at its rate) fills."""
    return max(1, -(-samples // int(cfg.sample_rate * cfg.clip_seconds)))


def preprocess_audio(wav: torch.Tensor, cfg: AlignerConfig) -> torch.Tensor:
    """(num_samples,) at the aligner's rate -> consecutive windows of `clip_seconds`, the last zero-padded:
    (windows, clip_seconds * sample_rate). A clip never gets cut: each window becomes K tokens of its own."""
    n, windows = int(cfg.sample_rate * cfg.clip_seconds), audio_windows(wav.shape[0], cfg)
    return F.pad(wav, (0, windows * n - wav.shape[0])).view(windows, n)


def audio_samples(path: Path, cfg: AlignerConfig) -> int:
    """A clip's length in samples at the aligner's rate, from its header (a `.npy` is at the aligner's rate)."""
    if path.suffix.lower() == ".npy":
        return max(check_npy(path, "audio").shape)
    info = wav_info(path)
    return math.ceil(info.data_bytes // (info.channels * info.bits // 8) * cfg.sample_rate / info.rate)


def check_image(path: Path) -> None:
    """An image checked before training: a `.npy`'s shape and dtype from its header, PNG/JPEG decoded, so that a
    missing or undecodable file is found before the first step (audio headers are read by `audio_samples`)."""
    if path.suffix.lower() == ".npy":
        check_npy(path, "image")
    else:
        load_image(path)



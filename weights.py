"""Weights on disk: JSON and safetensors read and written whole or not at all, shape checks that name what
is missing or extra, streaming a folder's tensors into a module built on the meta device.

    state = read_safetensors(Path("run/checkpoints/step_0000100/trainable.safetensors"))
    save_tensors(state, "copy.safetensors")          # written under a temporary name, then renamed
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face folder


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: `model.safetensors` or the shards named by `model.safetensors.index.json`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, "")["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: names shards that are not in the folder: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: holds neither model.safetensors nor model.safetensors.index.json")
    return [single]


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open of one file, on the CPU; a file that is not whole safetensors (cut short by a full disk or a
    killed copy, or another format) is a ValueError naming it, raised where it is opened or read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            yield sf
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be cut short: write it again, or "
                         "copy it again from where it came from") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on the CPU (`open_safetensors`' errors)."""
    with open_safetensors(path) as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str, ignore: tuple[str, ...] = ()
                  ) -> None:
    """Compare tensor names and shapes a module expects with those a file holds; a mismatch is one ValueError
    that starts with `where` and names the missing, unexpected and wrongly shaped tensors (names in `ignore` may
    be absent)."""
    missing = sorted(set(expected) - set(found) - set(ignore))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if missing or extra or wrong:
        parts = [f"{what}: {names[:5]}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("missing tensors", missing), ("unexpected tensors", extra),
                                     ("wrong shapes", wrong)) if names]
        raise ValueError(f"{where}; " + "; ".join(parts))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors (any device, any layout) to one safetensors file, with the metadata transformers expects;
    written under a temporary name and renamed, so the file is whole or absent, and readable by all (0644).
    Tensors that share memory (a module used twice) are written as copies."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    try:
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_hash(module: nn.Module | dict[str, torch.Tensor]) -> str:
    """A short hash of a module's state, or of named tensors (names, shapes and bytes): what a cache of its outputs
    was computed with."""
    h = hashlib.sha256()
    for name, t in sorted((module if isinstance(module, dict) else module.state_dict()).items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state_streaming(module: nn.Module, files: list[Path], device, dtype: torch.dtype | None,
                         skip: tuple[str, ...] = ()) -> None:
    """Copy tensors file by file into a module built on the meta device, after checking every key and shape.

    One tensor at a time is materialised on `device`, so peak host memory stays near one copy of the weights.
    Names in `skip` may be absent from the files (tied weights)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {}
    for f in files:
        with open_safetensors(f) as sf:
            found |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    check_tensors(expected, found, f"{files[0].parent}: checkpoint does not fit the model config (is the folder "
                  "for another model family or size?)", skip)
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                set_tensor(module, key, sf.get_tensor(key).to(device=device, dtype=dtype))


def set_tensor(module: nn.Module, key: str, t: torch.Tensor) -> None:
    """Replace the parameter or buffer `key` (dotted) of `module` with tensor `t`, keeping requires_grad."""
    *path, name = key.split(".")
    owner = module.get_submodule(".".join(path))
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(t, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = t


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Parameters made under it keep their values unset (random init returns its tensor as it is): a skeleton's
    weights are read next. On the meta device, random init runs through torch._refs, whose first call imports the
    compiler (seconds at the start of every generate.py)."""

    RANDOM = (torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_,
              nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RANDOM:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def skeleton():
    """Build modules on the meta device (shapes, no memory, no random values), to load their weights into."""
    with torch.device("meta"), SkipRandomInit():
        yield


def write_json(path: Path, doc: dict) -> None:
    """A JSON file written under a temporary name and renamed (whole or absent), readable by all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)



"""Hand-written LoRA (Hu et al., arXiv 2106.09685) for the LLM of model.py, with adapters in peft's format.

    wrapped = apply_lora(llm, rank=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    ...train...
    stack_lora(llm); fuse_qkv(llm)        # optional, training's kernels (train mode): fewer, larger matmuls
    save_adapter(llm, "export/adapter")   # PeftModel.from_pretrained(hf_model, "export/adapter") loads it as is
    merge_lora(llm)                       # fold B @ A into the base weights for inference
    with disable_adapters(llm): ...       # the model without its adapters (DPO's reference model)

A wrapped `q_proj` keeps peft's names: `q_proj.base_layer.weight`, `q_proj.lora_A.weight`, `q_proj.lora_B.weight`,
so an adapter's keys are ours with the prefix `base_model.model.`. A wrapped layer may itself be a LoRALinear: a
run that starts from another run's adapter (train.init_from) on a base it cannot merge into (NF4, or not yet
loaded) keeps that adapter frozen inside, `q_proj.base_layer.lora_A.weight`, and trains the outer one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from weights import check_tensors, save_tensors, write_json
from quant import NF4Linear

PEFT_PREFIX = "base_model.model."


def lora_down(x: torch.Tensor, weight: torch.Tensor, dropout: nn.Module, recompute: bool = False) -> torch.Tensor:
    """A(dropout(x)): (..., in) -> (..., r). With `recompute`, in compiled training, the dropout is recomputed in
    the backward, with the same random numbers, from x (which the backward keeps anyway) instead of keeping its mask
    and dropout(x): three bytes an element of x. A step recorded whole (train.cuda_graph, step_graph.py) asks for it:
    inside its recorded step the recomputation fuses into the backward's kernels, while a step run by the host pays
    for saving and restoring the generator's state at every adapter (eager, or compiled layers without the
    whole-step graph)."""
    if recompute and torch.compiler.is_compiling() and isinstance(dropout, nn.Dropout) and dropout.training:
        return checkpoint(dropout_linear, x, weight, dropout.p, use_reentrant=False)
    return F.linear(dropout(x), weight)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    return F.linear(F.dropout(x, p, training=True), weight)


class StackedLinear(torch.autograd.Function):
    """y = x W^T + h B^T + bias as one matmul over [x, h] and [W, B], stacked along the inner dimension: a frozen
    linear layer (W, bias) and the up-projection B (out, r) of its LoRA update, for h = A(dropout(x)) (..., r).

    One matmul in place of two, and no pass that adds the update to the base's output; the backward's one matmul
    dy [W, B] gives x's and h's gradients together, and B's is dy^T h. (Autograd through a concatenated weight would
    also compute the frozen W's gradient, a matmul as large as the forward's.) It computes in autocast's dtype
    under autocast, else in x's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = h.to(dtype)
        w = torch.cat([weight.to(dtype), lora_b.to(dtype)], dim=1)  # (out, in + r)
        ctx.save_for_backward(h, w)
        return F.linear(torch.cat([x.to(dtype), h], dim=-1), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        h, w = ctx.saved_tensors
        r = h.shape[-1]
        dx = dh = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dh = (dy @ w).split([w.shape[1] - r, r], dim=-1)  # (..., in), (..., r)
        if ctx.needs_input_grad[3]:
            db = dy.flatten(0, -2).T @ h.flatten(0, -2)  # (out, r)
        return dx, dh, None, db, None


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), with A kaiming-uniform, B zero (so y = base(x) at init).

    A and B are kept in fp32 even when the frozen base weight is bf16: the update B @ A is small next to W and
    would lose most of its bits in bf16. Training's kernel for the same formula is `StackedLoRALinear`."""

    def __init__(self, base_layer: nn.Linear | NF4Linear | LoRALinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base_layer
        dev = next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        if dev.type == "meta":  # a base without memory yet (FSDP's loading): the adapters are made for real, on the
            dev = torch.device("cpu")  # CPU, and sharding places them
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.merged = False
        self.disabled = False  # `disable_adapters`

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the adapter reads it: in A's dtype (fp32), unless autocast picks the matmuls' dtype."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + (self.lora_B(self.lora_A(self.lora_dropout(self.adapter_input(x)))) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in), fp32

    @torch.no_grad()
    def merge(self) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError("LoRA cannot be merged into an NF4 base layer (its 4-bit weight cannot hold the update); "
                             "the export merges against the dequantized weights (lora.merged_state_dict)")
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


class StackedLoRALinear(LoRALinear):
    """A LoRALinear with training's kernel, in train mode (in eval mode, evaluation and generation, it runs
    LoRALinear's forward): on a plain linear base, the base's matmul and B's as one (`StackedLinear`); with
    `recompute_dropout`, the dropout recomputed in the backward of compiled layers (`lora_down`). `stack_lora` puts
    it in each LoRALinear's place, with that layer's own modules and settings."""

    def __init__(self, lora: LoRALinear, recompute_dropout: bool = False):
        nn.Module.__init__(self)  # no new tensors: the layer's modules, under their names
        for name, child in lora.named_children():
            self.add_module(name, child)
        self.rank, self.alpha, self.scaling = lora.rank, lora.alpha, lora.scaling
        self.merged, self.disabled, self.training = lora.merged, lora.disabled, lora.training
        self.recompute_dropout = recompute_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.merged or self.disabled:
            return super().forward(x)
        h = lora_down(self.adapter_input(x), self.lora_A.weight, self.lora_dropout, self.recompute_dropout)  # (..., r)
        if isinstance(self.base_layer, nn.Linear):
            return StackedLinear.apply(x, h, self.base_layer.weight, self.lora_B.weight * self.scaling,
                                       self.base_layer.bias)
        out = self.base_layer(x)  # an NF4 base (quant.py) runs its own matmul: it keeps no dequantized weight for
        return out + (self.lora_B(h) * self.scaling).to(out.dtype)  # the backward


class BatchedLoRALinear(nn.Module):
    """Several runs' adapters on one frozen base layer, each row of a batch applying its own run's (the batched LoRA
    of S-LoRA and punica, arXiv 2311.03285, 2310.18547): y[b] = base(x[b]) + B_i A_i x[b] for i = index(n)[b], the
    run of row b, nothing merged. Every run's A is stacked into one (n*r, in) matrix and every scaled B into one
    (out, n*r), runs of a lower rank or without an adapter on this layer padded with zeros; x's product with all
    the A's is masked to row b's own r columns (a row of `mask`, gathered by the index) before the product with the
    B's: two matmuls for any mix of runs, in the same shapes for every batch (what a recorded decode step needs).

    `adapters[i]` is run i's (A (r, in), B (out, r) times its alpha / r) or None; `index(n)` gives the run of each
    of the n rows of the pass running, (n,) int64 (decode.RowSettings)."""

    def __init__(self, base_layer: nn.Linear | NF4Linear, adapters: list[tuple[torch.Tensor, torch.Tensor] | None],
                 index):
        super().__init__()
        self.base_layer, self.index = base_layer, index
        n, r = len(adapters), max((a.shape[0] for a, _ in filter(None, adapters)), default=1)
        dev = (base_layer.packed if isinstance(base_layer, NF4Linear) else base_layer.weight).device
        A = torch.zeros(n, r, base_layer.in_features, device=dev)  # fp32, as LoRALinear keeps them
        B = torch.zeros(base_layer.out_features, n, r, device=dev)
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                A[i, :len(adapter[0])] = adapter[0]
                B[:, i, :adapter[1].shape[1]] = adapter[1]
        self.register_buffer("lora_A", A.view(n * r, -1))  # (n*r, in)
        self.register_buffer("lora_B", B.view(len(B), n * r))  # (out, n*r)
        self.register_buffer("mask", torch.eye(n, device=dev).repeat_interleave(r, dim=1))  # (n, n*r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, T, in)
        out = self.base_layer(x)  # (b, T, out)
        x_lora = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        h = F.linear(x_lora, self.lora_A) * self.mask[self.index(len(x))][:, None]  # (b, T, n*r), other runs' 0
        return out + F.linear(h, self.lora_B).to(out.dtype)


def base_linear(m: nn.Module) -> nn.Linear:
    """The frozen linear layer of `m`: its base layer if LoRA wraps it, else `m` itself."""
    return m.base_layer if isinstance(m, LoRALinear) else m


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def outer_lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapters a run trains: every LoRA layer that is not the base layer of another (a frozen start adapter,
    train.init_from, is)."""
    mods = lora_modules(model)
    return {n: m for n, m in mods.items() if not (n.endswith(".base_layer") and n.removesuffix(".base_layer") in mods)}


def base_name(name: str) -> str:
    """A tensor's name in the base model: `q_proj.base_layer.weight` (and `q_proj.base_layer.base_layer.weight`) ->
    `q_proj.weight`."""
    while ".base_layer." in name:
        name = name.replace(".base_layer.", ".")
    return name


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """The model without the adapters it trains (peft's `disable_adapter`), for the length of the block: DPO's
    reference model is the same forward with them off. A frozen start adapter inside them stays on."""
    mods = list(outer_lora_modules(model).values())
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.disabled = False


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    """Freeze every parameter of `model`, then wrap the nn.Linear layers named in `targets` with LoRA.

    `targets` are module names matched on the last part of the path (`q_proj`), or "all-linear" for every
    linear layer of the decoder blocks (`lm_head` excluded, as in peft). A layer LoRA already wraps is wrapped
    whole (its adapter frozen inside the new one). Returns the wrapped module paths."""
    model.requires_grad_(False)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and ".layers." in f".{n}"
               and not any(n.startswith(w + ".") for w in wrapped)}
    if targets == "all-linear" or targets == ["all-linear"]:
        chosen = sorted(linears)
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        chosen = sorted(n for n in linears if n.rsplit(".", 1)[-1] in targets)
        unmatched = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in chosen)]
        if unmatched:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"LoRA targets {unmatched} match no linear layer of the model; its linear layers are "
                             f"{names} (or use 'all-linear')")
    for name in chosen:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return chosen


def stack_lora(model: nn.Module, recompute_dropout: bool = False) -> None:
    """Put a `StackedLoRALinear` (training's kernel, in train mode) in the place of every LoRALinear of `model`, a
    frozen one inside another included; the tensors and their names are unchanged. Call it before `fuse_qkv`, whose
    modules hold the layers they fuse."""
    for name in sorted(lora_modules(model), reverse=True):  # an adapter inside another first
        m = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, StackedLoRALinear(m, recompute_dropout))


class FusedQKV(nn.Module):
    """An attention layer's q, k and v as one matmul over their weights concatenated (each weight stays in its own
    module, under Hugging Face's name), then the LoRA updates of the wrapped layers, whose A matrices also run as one
    matmul on one dropout mask of the shared input, as loralib's MergedLinear (and peft on a fused qkv layer) does.
    Each adapter keeps its own A and B, so the adapter format does not change. Their B matrices run one by one:
    stacked into the base matmul as `StackedLinear` does for a single layer, they make the step slower and larger at
    long rows (BENCHMARKS.md). This is training's kernel, in train mode; in eval mode (evaluation, generation) each
    layer runs on its own: the concatenation would copy the weights at every token."""

    def __init__(self, attn: nn.Module, recompute_dropout: bool = False):
        super().__init__()
        self.layers = [attn.q_proj, attn.k_proj, attn.v_proj]  # a list, not submodules: they stay attn's
        self.recompute_dropout = recompute_dropout  # `lora_down`
        self.training = attn.training

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.training:
            return tuple(layer(x) for layer in self.layers)
        bases = [base_linear(m) for m in self.layers]
        bias = None if bases[0].bias is None else torch.cat([b.bias for b in bases])
        y = F.linear(x, torch.cat([b.weight for b in bases]), bias)  # (B, T, q + k + v)
        ys = list(y.split([b.out_features for b in bases], dim=-1))
        lora = [i for i, m in enumerate(self.layers) if isinstance(m, LoRALinear) and not (m.merged or m.disabled)]
        if lora:
            first = self.layers[lora[0]]
            x = first.adapter_input(x)
            a = torch.cat([self.layers[i].lora_A.weight for i in lora])  # (sum r, in)
            hs = lora_down(x, a, first.lora_dropout, self.recompute_dropout)  # (B, T, sum r)
            hs = hs.split([self.layers[i].rank for i in lora], dim=-1)  # (B, T, r) each
            for i, h in zip(lora, hs):
                m = self.layers[i]
                ys[i] = ys[i] + (m.lora_B(h) * m.scaling).to(ys[i].dtype)
        return tuple(ys)


def fuse_qkv(model: nn.Module, recompute_dropout: bool = False) -> int:
    """Install a `FusedQKV` (training's kernel, in train mode) as the `fused_qkv` of every attention layer of `model`
    (a module with q_proj, k_proj, v_proj and a `fused_qkv` slot). Returns the number of layers fused; the weights
    and their names are unchanged."""
    attns = [m for m in model.modules() if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "fused_qkv"))
             and isinstance(base_linear(m.q_proj), nn.Linear)]  # NF4 layers (quant.py) run one by one
    for attn in attns:
        attn.fused_qkv = FusedQKV(attn, recompute_dropout)
    return len(attns)


def merge_lora(model: nn.Module) -> None:
    """Add (alpha/r) B @ A into every wrapped base weight; the forward then skips the adapter."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain base layer back in its place (peft's name):
    the model is a plain one again, with the adapters' update in its weights."""
    for name, m in lora_modules(model).items():
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base_layer)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state under its base names (`q_proj.weight`, no adapter tensors) with every adapter folded into
    its base weight, W + (alpha/r) B @ A computed in fp32, then cast to `dtype` (default: the base weight's). The
    model is not changed. An NF4 base (quant.py) gives its dequantized weight, which the adapter was trained on."""
    wrapped = lora_modules(model)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in nf4}
    for n, m in nf4.items():
        state[f"{n}.weight"] = m.dequantized()
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias
    out = {}
    for name, t in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        owner, _, leaf = name.rpartition(".")
        owners = []  # the adapters around this tensor, innermost first
        while leaf == "weight" and owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
            if owner in wrapped and not wrapped[owner].merged:
                owners.append(wrapped[owner])
        if owners:
            t = (t.float() + sum(m.delta_weight() for m in owners)).to(t.dtype)
        out[base_name(name)] = t.detach().to(dtype or t.dtype)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the adapters `model` trains (`outer_lora_modules`) under our names (`...q_proj.lora_A.weight`)."""
    outer = outer_lora_modules(model)
    return {k: v for k, v in model.state_dict().items()
            if (".lora_A." in k or ".lora_B." in k) and k.rsplit(".lora_", 1)[0] in outer}


def adapter_factors(state: dict[str, torch.Tensor], scaling: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's tensors (our names) -> {module: (A (r, in), scaling * B (out, r))}: its update is B' @ A."""
    return {k.removesuffix(".lora_A.weight"): (v, scaling * state[k.replace(".lora_A.", ".lora_B.")])
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def stack_adapters(first: dict, second: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two adapters' `adapter_factors` as one adapter of their summed ranks (scale 1): A = [A1; A2], B = [B1', B2'],
    so that B @ A = B1' @ A1 + B2' @ A2. A module that one of them lacks gets zeros in its place."""
    r1, r2 = (next(iter(f.values()))[0].shape[0] for f in (first, second))
    out = {}
    for name in sorted(first.keys() | second.keys()):
        a, b = first.get(name) or second[name]
        (a1, b1), (a2, b2) = (f.get(name, (a.new_zeros(r, a.shape[1]), b.new_zeros(b.shape[0], r)))
                              for f, r in ((first, r1), (second, r2)))
        out[name] = torch.cat([a1.float(), a2.float()]), torch.cat([b1.float(), b2.float()], dim=1)
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None,
                 prior: dict | None = None) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` in peft's format (LoRA, CAUSAL_LM). `prior`: the
    `adapter_factors` of the adapter the model's adapters were trained on top of (train.init_from, merged into the
    base or kept frozen inside), saved with them as one adapter on the base (`stack_adapters`)."""
    mods = outer_lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers to save; call apply_lora first")
    any_mod = next(iter(mods.values()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, rank, alpha = lora_state_dict(model), any_mod.rank, any_mod.alpha
    if prior is not None:
        stacked = stack_adapters(prior, adapter_factors(state, any_mod.scaling))
        state = {f"{n}.lora_{x}.weight": t for n, ab in stacked.items() for x, t in zip("AB", ab)}
        rank = alpha = next(iter(stacked.values()))[0].shape[0]
    save_tensors({PEFT_PREFIX + k: v for k, v in state.items()}, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": getattr(any_mod.lora_dropout, "p", 0.0),
        "target_modules": sorted({n.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for n in state
                                  if n.endswith(".lora_A.weight")}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "base_model_name_or_path": base_model,
    }
    write_json(folder / "adapter_config.json", config)


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """A peft-format adapter folder: (its adapter_config.json, its tensors under our names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; an adapter folder holds adapter_config.json and "
                                    "adapter_model.safetensors")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    state = {k.replace(".default.", "."): v for k, v in state.items()}  # peft files saved with the adapter's name
    return json.loads(cfg_path.read_text()), state


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a peft-format LoRA adapter into a model already wrapped by `apply_lora` with the same rank and targets."""
    cfg, state = read_adapter(folder)
    set_adapter(model, state, cfg["r"], cfg["lora_alpha"], str(Path(folder) / "adapter_model.safetensors"))


def set_adapter(model: nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float, source: str) -> None:
    """Copy an adapter's tensors (our names) of rank `rank` and scale alpha / rank into the model's adapters."""
    mods = outer_lora_modules(model)
    ranks = {m.rank for m in mods.values()}
    if ranks != {rank}:
        raise ValueError(f"{source}: adapter rank r={rank} but the model's LoRA layers have rank {sorted(ranks)}")
    expected = lora_state_dict(model)
    check_tensors({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()},
                  f"{source}: adapter does not fit the model (other LoRA targets or base model?)")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
    for m in mods.values():  # the adapter's alpha defines its scale
        m.alpha, m.scaling = alpha, alpha / rank

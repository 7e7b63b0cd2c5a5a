"""LoRA: identity at init, merge, what trains, peft-format export checked by peft itself, the parameter count."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import QWEN25_05B_CONFIG, randomize_lora

import model
import multimodal
from lora import (StackedLinear, apply_lora, fuse_qkv, load_adapter, lora_down, merge_lora, save_adapter,
                  stack_lora, unmerge_lora)
from model import load_llm

def test_lora_parameter_count_on_meta_device():
    with torch.device("meta"):
        llm = model.LLM(model.LLMConfig.from_hf(QWEN25_05B_CONFIG))
    apply_lora(llm, rank=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == 2_162_688
    assert sum(p.numel() for p in llm.parameters()) == 494_032_768 + 2_162_688  # Qwen2.5-0.5B's published size


def test_init_is_identity_and_merge_equals_unmerged(hf_models):
    folder, _ = hf_models["llama"]
    llm = load_llm(folder)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = llm(ids)
        wrapped = apply_lora(llm, rank=4, alpha=8, targets="all-linear")
        assert len(wrapped) == 2 * 7
        torch.testing.assert_close(llm(ids), before, atol=0, rtol=0)
        randomize_lora(llm)
        unmerged = llm(ids)
        assert not torch.allclose(unmerged, before)
        merge_lora(llm)
        torch.testing.assert_close(llm(ids), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(llm)
        torch.testing.assert_close(llm(ids), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,targets", [("qwen2", ["q_proj", "v_proj"]), ("llama", "all-linear")])
def test_training_kernels_equal_the_plain_forward(hf_models, family, targets):
    """Training's kernels (`lora.stack_lora`: each base's matmul and B's as one; `lora.fuse_qkv`: q/k/v as one
    matmul with the adapters' A matrices stacked) give, in train mode, the logits and the gradients of the plain
    forward, and leave the weights' names as they were; in eval mode the model runs the plain forward itself."""
    llm = load_llm(hf_models[family][0])
    apply_lora(llm, rank=4, alpha=8, targets=targets)
    randomize_lora(llm)
    ids = torch.randint(0, 300, (2, 12))

    def step():
        llm.zero_grad()
        logits = llm(ids)
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad for n, p in llm.named_parameters() if p.requires_grad}

    llm.train()
    separate, grads = step()
    with torch.no_grad():
        plain = llm.eval()(ids)
    names = list(llm.state_dict())
    stack_lora(llm)
    assert fuse_qkv(llm) == llm.config.num_hidden_layers
    assert list(llm.state_dict()) == names  # the weights keep their names
    with torch.no_grad():
        assert torch.equal(llm(ids), plain)  # eval mode: the plain forward
    llm.train()
    fused, fused_grads = step()
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(fused_grads[n], g, atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("x_grad", [True, False])
def test_stacked_linear_equals_base_plus_update(x_grad):
    """`StackedLinear` (the base's matmul and B's as one, in training) gives the output and the gradients of
    x W^T + b + h B^T, and leaves the frozen W without a gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=x_grad)
    h = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    w, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    b = torch.randn(7, 3, generator=g, requires_grad=True)
    dy = torch.randn(2, 5, 7, generator=g)
    inputs = [t for t in (x, h, b) if t.requires_grad]
    want = F.linear(x, w, bias) + h @ b.T
    want_grads = torch.autograd.grad(want, inputs, dy)
    got = StackedLinear.apply(x, h, w, b, bias)
    torch.testing.assert_close(got, want)
    for name, gg, wg in zip(("x", "h", "B")[not x_grad:], torch.autograd.grad(got, inputs, dy), want_grads):
        torch.testing.assert_close(gg, wg, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = StackedLinear.apply(x, h, w, b, bias)
    assert y.dtype == torch.bfloat16
    (gb,) = torch.autograd.grad(y, b, dy.bfloat16())
    assert gb.dtype == torch.float32  # B's gradient in B's dtype
    # dy^T h of the bf16-rounded operands, summed in fp32; the kernel's bf16 output rounds to 8 bits
    bf16_want = torch.einsum("bto,btr->or", dy.bfloat16().float(), h.detach().bfloat16().float())
    torch.testing.assert_close(gb, bf16_want, atol=1e-2, rtol=2 ** -7)


def test_adapters_of_one_input_share_a_dropout_mask(hf_models):
    """Fused, q, k and v draw one dropout mask of their input (loralib's MergedLinear): with k's base weight and
    adapter made equal to the first rows of q's, k equals q's first features in training too."""
    llm = load_llm(hf_models["llama"][0])
    apply_lora(llm, rank=4, alpha=8, dropout=0.5, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_lora(llm)
    fuse_qkv(llm)
    attn = llm.model.layers[0].self_attn
    q, k = attn.q_proj, attn.k_proj
    n = k.base_layer.out_features
    with torch.no_grad():
        k.base_layer.weight.copy_(q.base_layer.weight[:n])
        k.lora_A.weight.copy_(q.lora_A.weight)
        k.lora_B.weight.copy_(q.lora_B.weight[:n])
    x = torch.randn(2, 12, llm.config.hidden_size)
    llm.train()
    yq, yk, _ = attn.fused_qkv(x)
    torch.testing.assert_close(yk, yq[..., :n], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(yq, q.base_layer(x), atol=1e-3)  # the adapter is there, with its dropout
    llm.eval()
    with torch.no_grad():
        yq, yk, _ = attn.fused_qkv(x)
    torch.testing.assert_close(yk, yq[..., :n], atol=1e-6, rtol=1e-6)


def test_compiled_dropout_is_recomputed_in_the_backward_with_the_forward_s_mask():
    """Compiled with `recompute` (as step_graph.GraphedStep asks), lora_down keeps no dropout mask and recomputes it in
    the backward: the gradients are those of the forward's mask (A the identity: the output is dropout(x), so its
    zeros are the mask)."""
    x, w = torch.randn(6, 16, requires_grad=True), torch.eye(16, requires_grad=True)
    drop = torch.nn.Dropout(0.5).train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torch.compile(lora_down)(x, w, drop, recompute=True)  # (6, 16)
    assert not [t for t in saved if t.dtype == torch.bool or t.shape == x.shape and t.data_ptr() != x.data_ptr()]
    c = torch.randn(6, 16)
    gx, gw = torch.autograd.grad((y * c).sum(), (x, w))
    kept = y != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(y, torch.where(kept, x.detach() * 2, 0.0))
    torch.testing.assert_close(gx, torch.where(kept, c * 2, 0.0))  # d/dx: the forward's mask, scaled by 1 / (1 - p)
    torch.testing.assert_close(gw, c.T @ y.detach())  # d/dA: dropout(x) as the forward drew it
    torch.manual_seed(1)
    eager = lora_down(x, w, drop, recompute=True)
    torch.manual_seed(1)
    assert torch.equal(eager, torch.nn.functional.linear(drop(x), w))  # eager: dropout, then A


def test_only_lora_tensors_change_after_a_step(hf_models):
    folder, _ = hf_models["qwen2"]
    llm = load_llm(folder)
    apply_lora(llm, rank=4, alpha=8, dropout=0.1)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    trainable = [p for p in llm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    llm.train()
    logits = llm(torch.randint(0, 300, (2, 12)))
    logits.logsumexp(-1).mean().backward()
    opt.step()
    changed = {k for k, v in llm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed) and any(".lora_A." in k for k in changed)


def test_unknown_target_is_a_clear_error(hf_models):
    llm = load_llm(hf_models["qwen2"][0])
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*q_proj"):
        apply_lora(llm, rank=4, alpha=8, targets=["q_proj", "qkv"])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path, hf_models, family):
    from peft import PeftModel

    folder, hf = hf_models[family]
    llm = load_llm(folder)
    apply_lora(llm, rank=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"])
    randomize_lora(llm)
    save_adapter(llm, tmp_path / "adapter", base_model=str(folder))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(llm(ids), peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    # and back: a fresh model with the same LoRA layout loads the adapter and gives the same logits
    again = load_llm(folder)
    apply_lora(again, rank=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"])
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), llm(ids), atol=0, rtol=0)
    wrong = load_llm(folder)
    apply_lora(wrong, rank=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"])
    with pytest.raises(ValueError, match="rank r=4"):
        load_adapter(wrong, tmp_path / "adapter")


def test_parameter_report_counts_parts():
    with torch.device("meta"):
        llm = model.LLM(model.LLMConfig.from_hf(QWEN25_05B_CONFIG))
    apply_lora(llm, rank=16, alpha=32)
    lora = [p for n, p in llm.named_parameters() if ".lora_" in n]
    base = [p for n, p in llm.named_parameters() if ".lora_" not in n]
    report = multimodal.parameter_report({"llm": base, "lora": lora})
    assert "2,162,688" in report and "494,032,768" in report

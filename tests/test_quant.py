"""QLoRA's NF4 base (quant.py): the format against a reference written from the paper, training on it against
training on its dequantized weights, resume and export of a QLoRA run, and the setups that are refused."""
import json

import numpy as np
import pytest
import torch
from conftest import demo_config, final_weights, rows

import generate
import lora
import quant
import build
import train
from checkpoint import export
from config import load_config
from model import load_llm

# the QLoRA paper's NF4 levels (Appendix E), as the reference writes them out
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0]


def reference_nf4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise NF4 as the paper defines it: each block's absmax, each value the nearest level of w / absmax."""
    blocks = w.reshape(-1, block).astype(np.float32)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / np.where(absmax > 0, absmax, 1)[:, None]
    idx = np.abs(scaled[..., None] - np.array(PAPER_NF4, dtype=np.float32)).argmin(-1)
    return idx.reshape(-1), absmax


@pytest.mark.parametrize("block", [64, 16])
def test_nf4_round_trip_equals_the_reference(block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * torch.rand(48, 1, generator=g)
    w[3, :block] = 0.0  # a block of zeros
    w[5, 7] = 9.0  # an outlier
    packed, absmax = quant.quantize_nf4(w, block)
    idx, ref_absmax = reference_nf4(w.numpy(), block)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    unpacked = torch.stack([packed >> 4, packed & 15], -1).reshape(-1).numpy()  # the first value in the high half
    assert (unpacked == idx).all() and np.array_equal(absmax.numpy(), ref_absmax)
    ref = (np.array(PAPER_NF4, dtype=np.float32)[idx].reshape(-1, block) * ref_absmax[:, None]).reshape(w.shape)
    assert np.array_equal(quant.dequantize_nf4(packed, absmax, tuple(w.shape), torch.float32).numpy(), ref)
    assert tuple(quant.NF4_LEVELS) == tuple(PAPER_NF4)


def test_double_quantization_keeps_the_scales_close():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    plain = quant.NF4Linear(w, None, 64, double_quant=False, dtype=torch.float32)
    double = quant.NF4Linear(w, None, 64, double_quant=True, dtype=torch.float32)
    assert (double.block_absmax() - plain.absmax).abs().max() < 0.01 * plain.absmax.max()
    assert (double.dequantized() - plain.dequantized()).abs().max() < 0.02 * w.abs().max()
    assert quant.nf4_bytes(double) < quant.nf4_bytes(plain) < w.numel() * 2 * 0.3


def test_against_bitsandbytes_where_it_imports():
    """The same packed bytes and block absmax as bitsandbytes' NF4 (blocks of 64, no double quantization), and the
    same weights back from them (fp32)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    packed, absmax = quant.quantize_nf4(w, 64)
    theirs, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(absmax, state.absmax.float()) and torch.equal(packed, theirs.reshape(-1))
    assert torch.equal(quant.dequantize_nf4(packed, absmax, w.shape, torch.float32), bnb.dequantize_4bit(theirs, state))


def test_a_lora_step_on_nf4_equals_one_on_its_dequantized_weights(hf_models):
    """The same LoRA, trained two steps on the NF4 base and on a float base holding its dequantized weights:
    the same losses and adapter gradients (fp32 compute on the CPU)."""
    folder = hf_models["qwen2"][0]
    nf4 = quant.load_llm_nf4(folder, "cpu", torch.float32, block_size=32)
    ref = load_llm(folder)
    with torch.no_grad():
        for name in quant.quantized_linears(ref):
            ref.get_submodule(name).weight.copy_(nf4.get_submodule(name).dequantized())
    assert sum(isinstance(m, quant.NF4Linear) for m in nf4.modules()) == len(quant.quantized_linears(ref)) == 14
    ids = torch.randint(0, nf4.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for name, llm in (("nf4", nf4), ("ref", ref)):
        torch.manual_seed(0)
        lora.apply_lora(llm, rank=4, alpha=8.0, targets="all-linear")
        llm.train()
        opt = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(2):
            logits = llm(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads[name] = {n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["nf4"] == pytest.approx(losses["ref"], rel=1e-3, abs=1e-5)
    for n, g in grads["ref"].items():
        torch.testing.assert_close(grads["nf4"][n], g, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged into an NF4 base"):
        lora.merge_lora(nf4)


QLORA = {"quantize": "nf4", "quant_block": 64}
QLORA_TRAIN = {"min_lr_ratio": 1.0, "warmup_steps": 0, "save_every": 2, "gen_samples": 0,
               "activation_checkpointing": True, "offload_activations": True}


@pytest.fixture(scope="module")
def qlora_run(demo_dir, tmp_path_factory):
    """A QLoRA run of 4 steps (checkpointed layers with their inputs offloaded), its model restored from the last
    checkpoint, and its export: (config, model, export folder)."""
    out = tmp_path_factory.mktemp("qlora")
    cfg = demo_config(demo_dir, out / "run", model=QLORA, train={**QLORA_TRAIN, "max_steps": 4})
    train.fit(cfg)
    _, mm = build.build_model(cfg, torch.device("cpu"))
    from checkpoint import read_checkpoint, restore_trainable
    ckpt = out / "run" / "checkpoints" / (out / "run" / "checkpoints" / "latest").read_text().strip()
    restore_trainable(ckpt, *read_checkpoint(ckpt, "trainable.safetensors"), mm)
    export(mm, out / "export", cfg)
    return cfg, mm.eval(), out / "export"


def test_a_qlora_run_resumes_exactly(demo_dir, tmp_path, qlora_run):
    cfg, _, _ = qlora_run
    half = demo_config(demo_dir, tmp_path, model=QLORA, train={**QLORA_TRAIN, "max_steps": 2})
    train.fit(half)
    train.fit(demo_config(demo_dir, tmp_path, model=QLORA, train={**QLORA_TRAIN, "max_steps": 4}))
    assert [r["loss"] for r in rows(cfg.run.out_dir)] == [r["loss"] for r in rows(tmp_path)]
    wa, wb = final_weights(cfg.run.out_dir), final_weights(tmp_path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(k.endswith(".packed") for k in wa)  # the 4-bit base is rebuilt from the base, never saved


def test_the_parameter_report_counts_each_nf4_weight_as_the_frozen_parameter_it_stands_for(demo_dir, tmp_path,
                                                                                        qlora_run):
    _, mm, _ = qlora_run
    assert any(isinstance(m, quant.NF4Linear) for m in mm.llm.modules())
    _, plain = build.build_model(demo_config(demo_dir, tmp_path), torch.device("cpu"))

    def llm_count(m):
        return sum(p.numel() for p in build.parameter_groups(m)["llm"])
    assert llm_count(mm) == llm_count(plain) > 0


def test_the_export_loads_merged_in_transformers_and_as_an_adapter_in_peft(demo_dir, qlora_run):
    """merged/ is the 4-bit base dequantized plus the update: transformers computes our logits. adapter/ on the
    unquantized base (peft): the adapter changes the logits as it changes ours, up to the quantization's error."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, mm, folder = qlora_run
    ids = torch.randint(0, mm.llm.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = mm.llm(ids)
        with lora.disable_adapters(mm.llm):
            ours_base = mm.llm(ids)
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(demo_dir / "llm").eval()
        hf_base = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, folder / "adapter").eval()
        theirs = peft(input_ids=ids).logits
    ours_update, peft_update = ours - ours_base, theirs - hf_base
    assert ours_update.abs().mean() > 1e-3  # the adapter trained: there is an update to compare
    # the same update, up to the 4-bit base's error: far closer to ours than no update at all
    assert (peft_update - ours_update).abs().mean() < 0.2 * ours_update.abs().mean()
    assert json.loads((folder / "mmlora.json").read_text())["config"]["model"]["quantize"] == "nf4"


def test_generate_keeps_the_4_bit_base_of_a_run_and_reads_an_export_as_it_is(qlora_run):
    cfg, mm, folder = qlora_run
    ids = torch.randint(0, mm.llm.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = mm.llm(ids)
    for run, nf4 in ((cfg.run.out_dir, True), (folder, False)):  # merged/ is not quantized again
        loaded, _, _ = generate.load_run(run, "latest", device="cpu", dtype="float32")
        assert any(isinstance(m, quant.NF4Linear) for m in loaded.llm.modules()) == nf4
        with torch.no_grad():
            torch.testing.assert_close(loaded.llm(ids), ours, rtol=1e-4, atol=1e-4)


def test_bad_qlora_setups_are_refused(hf_models):
    with pytest.raises(ValueError, match="model.quantize = \"nf4\" dequantizes into bf16"):
        load_config(None, ["--model.quantize=nf4", "--model.dtype=float32"])
    with pytest.raises(ValueError, match="train.strategy = \"fsdp\" is refused"):
        load_config(None, ["--model.quantize=nf4", "--train.strategy=fsdp"])
    with pytest.raises(ValueError, match="rows of 96 values are not a whole number of NF4 blocks of 64"):
        quant.load_llm_nf4(hf_models["qwen2"][0], "cpu", torch.float32, block_size=64)
    with pytest.raises(ValueError, match="a power of two"):
        quant.load_llm_nf4(hf_models["qwen2"][0], "cpu", torch.float32, block_size=48)

"""Preference tuning (train.objective = "dpo"): TRL's DPO as the oracle of the losses, rewards and gradients, the
reference model with the adapters off, exact resume, 2 ranks, an NF4 base, the export, and bad preference data."""
import copy
import json
import math

import pytest
import torch
from conftest import ROOT, cli_args, demo_config, final_weights, randomize_lora, rows, small_bench, torchrun

import bench
import build
import data
import dpo
import generate
import lora
import preference
import train
from config import load_config
from distributed import World

LN2 = math.log(2.0)


def dpo_config(demo_dir, start, out, **sections):
    """A DPO run on the small demo's preference pairs, from the SFT run `start`; `sections` as in demo_config."""
    keys = {"objective": "dpo", "init_from": str(start), "max_steps": 4, "batch_size": 2, "grad_accum": 2,
            "lr_lora": 2e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "gen_samples": 0, **sections.pop("train", {})}
    files = {"train_file": str(demo_dir / "data/preference_train.jsonl"), "val_file": "", **sections.pop("data", {})}
    return demo_config(demo_dir, out, train=keys, data=files, lora={"dropout": 0.0, **sections.pop("lora", {})},
                       **sections)


@pytest.fixture(scope="module")
def straight(demo_dir, trained_run, tmp_path_factory):
    """An uninterrupted DPO run (4 steps of 2 x 2 pairs) from the shared SFT run, with its export: its out_dir."""
    out = tmp_path_factory.mktemp("dpo_straight")
    # a peak given on the CPU: each row's MFU is computed, as on a GPU (a DPO run counts pairs: no figure)
    train.fit(dpo_config(demo_dir, trained_run, out, run={"peak_tflops": 1.0}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL's DPOTrainer as the oracle


PAIRS = [("The red circle is on the", "left", "right"), ("Count the beeps:", "three short beeps", "two beeps"),
         ("What is shown in the picture?", "A blue square", "A red circle at the top"),
         ("Hello, how are you?", "I am fine, thank you.", "The tone is low.")]


@pytest.fixture(scope="module")
def oracle(hf_models, demo_dir, tmp_path_factory):
    """Our model and TRL's DPOTrainer (peft, the reference with the adapter disabled) on one small Qwen2 model with the
    same LoRA weights, and one preference batch, text only."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    folder, hf = hf_models["qwen2"]
    tmp = tmp_path_factory.mktemp("trl")
    cfg = load_config(None, [f"--model.llm={folder}", f"--model.aligner={demo_dir / 'aligner-init'}",
                             "--model.chat_format=chatml", "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0",
                             "--data.max_len=64"])
    cfg.train.objective = "dpo"  # (no train.init_from: the model as built is the start)
    tokenizer, mm = build.build_model(cfg, torch.device("cpu"))
    randomize_lora(mm.llm)
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    ds = preference.PreferenceDataset(path, tokenizer, mm.aligner.config, cfg.model.tokens_per_media, 64)
    batch = preference.collate_preferences([ds[i] for i in range(len(ds))], tokenizer.pad_id)

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<|endoftext|>",
                                     eos_token="<|im_end|>")
    # a new adapter (peft_config): TRL's reference is the model with it disabled, as ours
    trainer = DPOTrainer(model=copy.deepcopy(hf), peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                         target_modules=["q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"]),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         args=DPOConfig(output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False),
                         processing_class=hf_tok)
    with torch.no_grad():  # our adapters' weights, as if trained
        for name, p in trainer.model.named_parameters():
            if ".lora_" in name:
                p.copy_(mm.llm.get_parameter(name.removeprefix("base_model.model.").replace(".default", "")))
    return cfg, mm, batch, trainer


def trl_inputs(batch: preference.PreferenceBatch, swap: bool = False) -> dict:
    """TRL's collated batch of the same rows: [chosen; rejected], right-padded, the answer tokens marked."""
    b, S = batch.rows, batch.pairs
    order = torch.cat([torch.arange(S, 2 * S), torch.arange(S)]) if swap else torch.arange(2 * S)
    completion = torch.zeros_like(b.input_ids)
    completion[:, 1:] = b.labels[:, :-1] != -100  # labels[t] is the target of position t: the token t + 1
    lengths = torch.tensor(b.lengths)
    mask = (torch.arange(b.input_ids.shape[1])[None] < lengths[:, None]).long()
    return {"input_ids": b.input_ids[order], "attention_mask": mask[order], "completion_mask": completion[order]}


def trl_step(trainer, inputs: dict, loss_types: list[str], weights: list[float], beta: float
             ) -> tuple[float, dict, dict]:
    """TRL's loss, its logged metrics and the LoRA gradients (under our names) of one batch."""
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, loss_types, weights
    trainer._metrics["train"].clear()
    model = trainer.model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs, False)
    loss.backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}, grads


@pytest.mark.parametrize("loss,smoothing,rpo", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.2, 0.0), ("ipo", 0.0, 0.0),
                                                ("sigmoid", 0.0, 0.5)], ids=["sigmoid", "smoothed", "ipo", "sft-term"])
def test_losses_rewards_and_gradients_equal_trls(oracle, loss, smoothing, rpo):
    cfg, mm, batch, trainer = oracle
    cfg = copy.deepcopy(cfg)
    cfg.train.dpo_loss, cfg.train.dpo_label_smoothing, cfg.train.rpo_alpha = loss, smoothing, rpo
    mm.train().zero_grad(set_to_none=True)
    scaler, autocast = train.mixed_precision(cfg.train, torch.device("cpu"))
    stats, pairs = dpo.forward_backward(mm, [batch], scaler, autocast, World(), cfg.train)
    ours = dpo.metrics(stats, cfg.train)
    grads = {n.removeprefix("llm."): p.grad for n, p in mm.named_parameters() if p.requires_grad}

    types, weights = (["sigmoid", "sft"], [1.0, rpo]) if rpo else ([loss], [1.0])
    ref_loss, ref, ref_grads = trl_step(trainer, trl_inputs(batch), types, weights, cfg.train.dpo_beta)
    if smoothing:  # cDPO: (1 - e) * DPO(chosen over rejected) + e * DPO(rejected over chosen)
        flipped, _, flipped_grads = trl_step(trainer, trl_inputs(batch, swap=True), types, weights, cfg.train.dpo_beta)
        ref_loss = (1 - smoothing) * ref_loss + smoothing * flipped
        ref_grads = {k: (1 - smoothing) * g + smoothing * flipped_grads[k] for k, g in ref_grads.items()}
    assert int(pairs) == len(PAIRS)
    assert ours["loss"] == pytest.approx(ref_loss, rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert abs(ours["rewards/chosen"]) > 1e-3 and abs(ours["rewards/margins"]) > 1e-3  # the adapters moved the policy
    assert grads.keys() == ref_grads.keys() and len(grads) == 16  # LoRA only (the projectors are frozen in DPO)
    for k, g in grads.items():
        # fp32 sums in another order (fused q, k, v; chunked lm_head): errors scale with the gradient
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)


# ----------------------------------------------------------------------------------------------------------------
# The reference model, resume, ranks, NF4


def test_reference_is_the_start_model_with_no_gradient(demo_dir, trained_run, tmp_path):
    """With the run's adapters off, the DPO model (the start's LoRA merged, its projectors) gives the logits of the
    start loaded on its own, from its export (merged as the DPO run merges it) and from its run folder (LoRA
    unmerged); the reference's log-probabilities carry no gradient."""
    cfg = dpo_config(demo_dir, trained_run, tmp_path)
    _, mm = build.build_model(cfg, torch.device("cpu"))
    randomize_lora(mm.llm)  # this run's adapters, as if trained
    start, tokenizer, _ = generate.load_run(trained_run)
    ds = preference.PreferenceDataset(demo_dir / "data/preference_val.jsonl", tokenizer, mm.aligner.config,
                                cfg.model.tokens_per_media, cfg.data.max_len)
    batch = preference.collate_preferences([ds[i] for i in range(6)], tokenizer.pad_id)
    assert batch.rows.media and all(len(x.slots) == 2 * len(x) * cfg.model.tokens_per_media[m]
                                    for m, x in batch.rows.media.items())  # each medium once, in both its rows

    def logits(model):
        return model.llm.lm_head(model.llm.hidden_states(model.embed(batch.rows)))

    mm.eval()
    with torch.no_grad():
        expected, unmerged, policy = logits(generate.load_run(trained_run / "export")[0]), logits(start), logits(mm)
        with lora.disable_adapters(mm.llm):
            reference = logits(mm)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference, unmerged, rtol=1e-4, atol=2e-5 * unmerged.abs().max().item())
    assert (policy - expected).abs().max() > 1e-2

    mm.train()
    policy, reference, _ = dpo.logps(mm, mm, batch)
    assert reference.grad_fn is None and not reference.requires_grad and policy.requires_grad
    policy.sum().backward()
    with_grad = {n for n, p in mm.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in mm.named_parameters() if p.requires_grad} and all(".lora_" in n
                                                                                         for n in with_grad)


def test_resume_after_a_crash_is_bit_exact(demo_dir, trained_run, straight, tmp_path, monkeypatch):
    cfg = dpo_config(demo_dir, trained_run, tmp_path)
    real, calls = dpo.forward_backward, {"n": 0}

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(dpo, "forward_backward", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train.fit(cfg)
    monkeypatch.undo()
    assert json.loads((tmp_path / "checkpoints" / "emergency" / "state.json").read_text())["step"] == 2
    train.fit(cfg)
    a, b = rows(straight), rows(tmp_path)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if "/" in k or k == "loss"} for r in a] == \
        [{k: v for k, v in r.items() if "/" in k or k == "loss"} for r in b]
    assert a[0]["loss"] == pytest.approx(LN2, abs=1e-6) and a[-1]["loss"] < a[0]["loss"]  # from the reference down
    wa, wb = final_weights(straight), final_weights(tmp_path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(".lora_" in k for k in wa)  # the projectors stay the start's
    header = (straight / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"rewards/accuracies", "logps/rejected", "rewards/margins_image", "pairs"} <= set(header)
    assert len(header) == len(set(header))


def test_two_ranks_equal_one_with_the_same_global_batch(demo_dir, trained_run, straight, tmp_path):
    cfg = dpo_config(demo_dir, trained_run, tmp_path, train={"batch_size": 1})
    r = torchrun(cli_args(cfg), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = rows(straight), rows(tmp_path)
    assert len(a) == len(b) == 4 and all(x["pairs"] == y["pairs"] == 4 for x, y in zip(a, b))
    for x, y in zip(a, b):  # the gradient norm shows the loss's scale, which AdamW's updates hide
        for key in ("loss", "logps/chosen", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], abs=1e-5)  # a difference of two rewards
    # AdamW moves each weight by about lr at first, whatever its gradient's size: where chosen and rejected rows'
    # gradients all but cancel (q and k, over a shared prompt), rounding may turn an update's sign. The weights
    # agree as a whole, not each one
    wa, wb = final_weights(straight), final_weights(tmp_path)
    moved = torch.stack([wa[k].norm() for k in wa if ".lora_B." in k]).norm()  # B starts at zero
    assert torch.stack([(wb[k] - wa[k]).norm() for k in wa]).norm() < 0.02 * moved


def test_a_dpo_run_on_an_nf4_base_keeps_the_start_adapter_frozen(demo_dir, trained_run, tmp_path):
    """On an NF4 base the start's adapter cannot be merged: it stays inside the new adapters, frozen, on in both
    passes (so the first step's policy is its reference exactly), and the export holds both updates."""
    cfg = dpo_config(demo_dir, trained_run, tmp_path, model={"quantize": "nf4"}, train={"max_steps": 2})
    train.fit(cfg)
    first = rows(tmp_path)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == 0.0
    model, _, _ = generate.load_run(tmp_path, "latest")
    start = final_weights(trained_run)
    q = model.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, lora.LoRALinear) and not q.base_layer.lora_A.weight.requires_grad
    assert torch.equal(q.base_layer.lora_B.weight, start["llm.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert q.lora_B.weight.abs().max() > 0  # this run's adapter moved
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 8  # the start's rank 4 and this run's, as one adapter


# ----------------------------------------------------------------------------------------------------------------
# Export and use


def test_the_export_holds_both_updates_and_generate_answers_with_it(demo_dir, trained_run, straight, monkeypatch):
    """adapter/ on the base (peft) and merged/ (transformers) give the DPO run's logits, those of the start's LoRA
    and the run's together; generate.py answers the same from the run and from its export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = straight / "export"
    run, tokenizer, cfg = generate.load_run(straight, "latest")
    exported, _, _ = generate.load_run(out)
    ids = torch.randint(0, run.llm.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = run.llm(ids)
        tol = dict(atol=2e-5 * ours.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits,
                                   ours, **tol)
        base = AutoModelForCausalLM.from_pretrained(demo_dir / "llm")
        peft = PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, ours, **tol)
        torch.testing.assert_close(exported.llm(ids), ours, **tol)
        start, _, _ = generate.load_run(trained_run)
        assert (start.llm(ids) - ours).abs().max() > 1e-3  # DPO moved the model
    ds = preference.PreferenceDataset(demo_dir / "data/preference_val.jsonl", tokenizer, run.aligner.config,
                                cfg.model.tokens_per_media, cfg.data.max_len)
    prompts = data.collate([ds.prompt(i)[0] for i in range(4)], tokenizer.pad_id)
    assert run.generate(prompts, 4) == exported.generate(prompts, 4)


# ----------------------------------------------------------------------------------------------------------------
# Bad data and setups


BAD = {
    "missing chosen": ({"prompt": "<image>\nWhat colour?", "rejected": "red"}, "no 'chosen' answer"),
    "chosen equals rejected": ({"prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": "red"},
                               "'chosen' and 'rejected' are the same answer"),
    "blank rejected": ({"prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": " "}, "'rejected' is empty"),
    "prompt ends on an assistant turn": (
        {"prompt": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
         "chosen": "red", "rejected": "blue"}, "the prompt ends on an assistant turn"),
    "media in one answer only": ({"prompt": "What colour?", "chosen": "<image> red", "rejected": "blue"},
                                 "<image> in the chosen answer only"),
    "different prompts": ({"chosen": [{"role": "user", "content": "<image>\nWhat colour?"},
                                      {"role": "assistant", "content": "red"}],
                           "rejected": [{"role": "user", "content": "<image>\nWhat shape?"},
                                        {"role": "assistant", "content": "square"}]},
                          "'chosen' and 'rejected' answer different prompts"),
}


def test_bad_preference_data_is_one_line_naming_file_and_line_or_a_listed_skip(demo_dir, trained_run, tmp_path):
    import validate
    from tokenizer import load_tokenizer
    from encoders import aligner_config
    image = str(demo_dir / "data" / "media" / "train-00001.npy")
    good = {"prompt": [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], "chosen": "green",
            "rejected": [{"role": "assistant", "content": "blue"}]}
    tokenizer, aligner = load_tokenizer(demo_dir / "llm", "chatml"), aligner_config(demo_dir / "aligner-init")
    path = tmp_path / "pairs.jsonl"

    def write(records: list[dict]) -> None:
        path.write_text("".join(json.dumps({"image": image, **r}) + "\n" for r in records))

    def dataset(records: list[dict], on_error: str = "raise") -> preference.PreferenceDataset:
        write(records)
        return preference.PreferenceDataset(path, tokenizer, aligner, {"image": 16, "audio": 16}, 128,
                                            on_error=on_error, allow_outside_paths=True)
    for name, (record, reason) in BAD.items():
        with pytest.raises(data.SampleError) as e:
            dataset([good, record])
        assert str(e.value).startswith(f"{path}:2: sample 'line2': {reason}") and "\n" not in str(e.value), name
    ds = dataset([good, *(r for r, _ in BAD.values()), good], on_error="skip")
    assert len(ds) == 2 and [s["line"] for s in ds.skipped] == list(range(2, 2 + len(BAD)))
    assert all(s["reason"].startswith(reason) for s, (_, reason) in zip(ds.skipped, BAD.values()))

    # validate.py: a bad file fails its data check with the file and line; the demo's pairs pass it and the DPO
    # forward (the policy is its reference at the start)
    write([good, BAD["media in one answer only"][0]])
    for train_file, passed in ((path, False), (demo_dir / "data/preference_train.jsonl", True)):
        results = validate.validate(dpo_config(demo_dir, trained_run, tmp_path / "run", data={
            "train_file": str(train_file), "allow_outside_paths": True}), quick=True, last="Forward pass")
        if not passed:
            assert not results[3]["passed"] and f"{path}:2: sample 'line2': <image> in the chosen answer only" \
                in results[3]["detail"]
    assert len(results) == 5 and all(r["passed"] for r in results), results
    assert "preference pairs" in results[3]["detail"] and "ln 2" in results[4]["detail"]


@pytest.mark.parametrize("override,message", [
    ("--train.objective=dpo", "set train.init_from to its run folder"),
    ("--train.objective=dpo --train.init_from=x --train.dpo_loss=ipo --train.dpo_label_smoothing=0.1",
     "IPO has none"),
    ("--train.objective=dpo --train.init_from=x --data.pack=true", "set data.pack = false"),
    ("--train.objective=dpo --train.init_from=x --train.compile=reduce-overhead",
     "use train.compile = \"default\" or \"none\" with train.objective = \"dpo\""),
    ("--train.objective=dpo --train.init_from=x --train.dpo_label_smoothing=0.5", "it must be in [0, 0.5)"),
    ("--train.phase=align --train.init_from=x", "set train.init_from = \"\""),
])
def test_bad_dpo_setups_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, override.split())


def test_a_statically_padded_batch_gives_the_same_step():
    """The recorded step's batch (`PreferenceBatch.pad_static`: labelled positions at weight 0, media padded to a
    multiple of the rows, each of the chosen and rejected copies alike) gives the plain batch's losses, rewards and
    gradients."""
    args, cfg, mm = small_bench("cpu", dpo=True, multimodal=True)
    for m in mm.modules():  # no dropout: a widened batch would draw other masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = bench.make_batch(args, mm, torch.device("cpu"), torch.Generator().manual_seed(0))
    padded = batch.pad_static(16)
    copy_ = padded.apply(torch.clone)  # what the recorded step keeps of its inputs
    assert all(a is not b and torch.equal(a, b) for a, b in zip(copy_.tensors(), padded.tensors()))
    assert any(len(padded.rows.media[m]) > len(x) for m, x in batch.rows.media.items())
    assert len(padded.rows.label_index) > len(batch.rows.label_index)
    scaler, autocast = train.mixed_precision(cfg.train, torch.device("cpu"))
    results = []
    for b in (batch, padded):
        mm.train().zero_grad(set_to_none=True)
        stats, pairs = dpo.forward_backward(mm, [b], scaler, autocast, World(), cfg.train)
        results.append((stats, pairs, {n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None}))
    (stats, pairs, grads), (stats_p, pairs_p, grads_p) = results
    torch.testing.assert_close(stats_p, stats, rtol=1e-5, atol=1e-6)
    assert pairs_p == pairs and grads_p.keys() == grads.keys() and len(grads) > 0
    for k, g in grads.items():
        torch.testing.assert_close(grads_p[k], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=k)


def test_a_missing_start_is_named_before_anything_is_made(tmp_path):
    """train.init_from that names no run, checkpoint or export is refused as the run starts: before the demo's assets
    and its Phase-1 aligner are made (minutes on a CPU)."""
    cfg = load_config(str(ROOT / "configs" / "demo-dpo.toml"), [
        f"--data.make_demo={tmp_path / 'demo'}", f"--train.init_from={tmp_path / 'nowhere'}",
        f"--run.out_dir={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match="nowhere: no export"):
        train.fit(cfg, World())
    assert not (tmp_path / "demo").exists()

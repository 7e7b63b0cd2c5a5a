"""train.strategy = "fsdp" (torch's FSDP2) on CPU gloo ranks: 2 sharded ranks train as 1 rank, checkpoints move
between strategies and rank counts, each rank reads only its rows of the base, and bad setups are clear errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import cli_args, demo_config, final_weights, rows, torchrun

import generate
import train
from model import load_llm, save_llm


def losses(out_dir):
    return [r["loss"] for r in rows(out_dir)]


def untied_llm(demo_dir, folder):
    """The demo's LLM with an lm_head of its own (as 7B-and-larger bases have), in `folder`."""
    llm = load_llm(demo_dir / "llm")
    llm.config.tie_word_embeddings = False
    state = {k: v.clone() for k, v in llm.state_dict().items()}  # lm_head.weight: a copy of the embeddings
    save_llm(llm, folder, state=state)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / "llm" / f, folder / f)
    return str(folder)


def test_two_sharded_ranks_train_as_one(demo_dir, tmp_path):
    """4 steps with grad_accum 2 and an eval: losses and final weights of 1 rank (ddp) and 2 ranks (fsdp), on an
    LLM whose input embeddings are an FSDP unit of their own (untied from lm_head)."""
    keys = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "eval_every": 4, "gen_samples": 4}
    llm = untied_llm(demo_dir, tmp_path / "llm")
    one = demo_config(demo_dir, tmp_path / "one", model={"llm": llm}, lora={"dropout": 0.0},
                      train={**keys, "batch_size": 4})
    train.fit(one)
    two = demo_config(demo_dir, tmp_path / "two", model={"llm": llm}, lora={"dropout": 0.0},
                      train={**keys, "strategy": "fsdp"})
    res = torchrun(cli_args(two), 2)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    va, vb = rows(tmp_path / "one", "val")[-1], rows(tmp_path / "two", "val")[-1]
    assert vb["loss"] == pytest.approx(va["loss"], rel=1e-5) and vb["answered"] == va["answered"] == 4
    # a run trained sharded is used whole: generate.load_run gives the 1-rank run's model
    (ma, _, _), (mb, _, _) = (generate.load_run(tmp_path / r, "latest", device="cpu") for r in ("one", "two"))
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_checkpoints_move_between_strategies_and_rank_counts(demo_dir, tmp_path):
    """A run stopped at step 2 under fsdp on 2 ranks resumes under ddp on 1 rank, and one stopped under ddp resumes
    under fsdp on 2 ranks, with the uninterrupted run's losses."""
    keys = {"max_steps": 4, "batch_size": 4, "save_every": 2, "min_lr_ratio": 1.0}
    straight = demo_config(demo_dir, tmp_path / "straight", lora={"dropout": 0.0}, train=keys)
    train.fit(straight)
    expected = losses(tmp_path / "straight")

    a = demo_config(demo_dir, tmp_path / "a", lora={"dropout": 0.0},
                    train={**keys, "max_steps": 2, "batch_size": 2, "strategy": "fsdp"})
    assert torchrun(cli_args(a), 2).returncode == 0
    train.fit(demo_config(demo_dir, tmp_path / "a", lora={"dropout": 0.0}, train=keys))
    np.testing.assert_allclose(losses(tmp_path / "a"), expected, rtol=1e-5)

    b = demo_config(demo_dir, tmp_path / "b", lora={"dropout": 0.0}, train={**keys, "max_steps": 2})
    train.fit(b)
    resumed = demo_config(demo_dir, tmp_path / "b", lora={"dropout": 0.0},
                          train={**keys, "batch_size": 2, "strategy": "fsdp"})
    res = torchrun(cli_args(resumed), 2)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "b"), expected, rtol=1e-5)
    wa, wb = final_weights(tmp_path / "straight"), final_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


SHARD_DRIVER = r'''
import json, os, sys
import torch
sys.path.insert(0, os.getcwd())
import build
import train
from config import load_config
from distributed import setup_distributed, shard_rows
from model import load_llm
cfg = load_config(None, sys.argv[1:])
world = setup_distributed(cfg)
_, model = build.build_model(cfg, world.device, world=world)
full = load_llm(cfg.model.llm)
out = {}
for name, p in model.llm.named_parameters():
    if ".lora_" in name:
        continue
    first, rows = shard_rows(p)
    local = p.to_local()
    want = full.get_parameter(name.replace(".base_layer.", "."))[first:first + rows]
    out[name] = [first, rows, bool(torch.equal(local, want))]
json.dump(out, open(os.environ["OUT_JSON"] + str(world.rank), "w"))
'''


def test_sharded_loading_reads_each_ranks_rows(demo_dir, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_DRIVER)
    cfg = demo_config(demo_dir, tmp_path / "run", train={"strategy": "fsdp"})
    res = torchrun(cli_args(cfg), 2, script=script, env={"OUT_JSON": str(tmp_path / "rank")})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and "model.layers.0.self_attn.q_proj.base_layer.weight" in ranks[0]
    for name in ranks[0]:
        (f0, n0, ok0), (f1, n1, ok1) = ranks[0][name], ranks[1][name]
        assert ok0 and ok1, name
        assert f0 == 0 and f1 == n0 and n1 <= n0  # rank 1's rows follow rank 0's


def test_fsdp_setup_errors(demo_dir, tmp_path):
    cfg = demo_config(demo_dir, tmp_path / "one", train={"strategy": "fsdp"})
    with pytest.raises(ValueError, match="under torchrun with 2 or more"):
        train.fit(cfg)
    with pytest.raises(ValueError, match="cuda_graph = false"):
        demo_config(demo_dir, tmp_path, train={"strategy": "fsdp", "cuda_graph": True})
    with pytest.raises(ValueError, match="strategy = \"ddp\""):
        demo_config(demo_dir, tmp_path, train={"strategy": "fsdp", "phase": "align"})

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


def test_two_sharded_ranks_train_as_one_and_checkpoints_move_between_strategies(demo_dir, tmp_path):
    """On an LLM whose input embeddings are an FSDP unit of their own (untied from lm_head), with grad_accum 2: a run
    of 1 rank (ddp) to step 2, resumed on 2 sharded ranks (fsdp) to step 4 with an eval, resumed on 1 rank to step 6,
    has the losses, eval and final weights of 1 rank straight through; and the checkpoint written sharded loads whole
    in generate.py."""
    # a constant learning rate after warmup: the cosine schedule depends on max_steps, which each part sets
    keys = {"batch_size": 4, "grad_accum": 2, "eval_every": 4, "gen_samples": 4, "save_every": 2, "min_lr_ratio": 1.0}
    llm = untied_llm(demo_dir, tmp_path / "llm")

    def config(out, **train):
        return demo_config(demo_dir, tmp_path / out, model={"llm": llm}, lora={"dropout": 0.0}, train={**keys, **train})
    train.fit(config("straight", max_steps=6))
    train.fit(config("moved", max_steps=2))
    res = torchrun(cli_args(config("moved", max_steps=4, batch_size=2, strategy="fsdp")), 2)
    assert res.returncode == 0, res.stderr[-3000:]
    train.fit(config("moved", max_steps=6))

    np.testing.assert_allclose(losses(tmp_path / "moved"), losses(tmp_path / "straight"), rtol=1e-5)
    assert len(losses(tmp_path / "moved")) == 6
    wa, wb = final_weights(tmp_path / "straight"), final_weights(tmp_path / "moved")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    va, vb = (next(r for r in rows(tmp_path / out, "val") if r["step"] == 4) for out in ("straight", "moved"))
    assert vb["loss"] == pytest.approx(va["loss"], rel=1e-5) and vb["answered"] == va["answered"] == 4
    # the checkpoint of step 4, trained sharded, is used whole: generate.load_run gives the 1-rank run's model
    (ma, _, _), (mb, _, _) = (generate.load_run(tmp_path / out, str(tmp_path / out / "checkpoints" / "step_0000004"),
                                                device="cpu") for out in ("straight", "moved"))
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, rtol=1e-4, atol=1e-5)


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

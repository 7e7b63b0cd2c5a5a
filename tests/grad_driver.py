"""One Phase-1 step's gradients, for tests/test_align.py (run as a script, also under torchrun): the first
`GLOBAL` pairs of data.train_file split among the ranks; rank 0 writes every trainable parameter's gradient
(DDP-averaged) to GRADS_OUT.

    GLOBAL=6 GRADS_OUT=g.pt torchrun --nproc_per_node=2 tests/grad_driver.py --train.phase=align ...
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import build
import train  # noqa: E402
from config import load_config
from distributed import data_parallel, setup_distributed

cfg = load_config(None, sys.argv[1:])
world = setup_distributed(cfg)
tokenizer, model = build.build_model(cfg, world.device, world=world)  # negatives from every rank
ds = train.make_dataset(cfg, cfg.data.train_file, tokenizer, model.aligner)
share = int(os.environ["GLOBAL"]) // world.size
batch = data.collate_pairs([ds[i] for i in range(world.rank * share, (world.rank + 1) * share)], tokenizer.pad_id)
scaler, autocast = train.mixed_precision(cfg.train, world.device)
train.forward_backward(data_parallel(model, world), [batch], scaler, autocast, world)
if world.master:
    torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, os.environ["GRADS_OUT"])
if torch.distributed.is_initialized():  # an orderly exit: gloo's threads end before the process does
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

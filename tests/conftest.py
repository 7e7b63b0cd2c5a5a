"""Shared fixtures and helpers: tiny Hugging Face checkpoints of each supported family (transformers as the oracle),
the small demo, configs on it, and running train.py in a subprocess or under torchrun."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One thread a process: the suite runs two workers on two cores (pytest.ini), and the tests' models are small, so
# more threads would only wait on each other. Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from config import Config, check_config  # noqa: E402

CORPUS = [
    "The red circle is on the left. A blue square sits at the top right.",
    "Hello, how are you? I am fine, thank you. What is shown in the picture?",
    "Count the beeps: three short beeps. The tone is high. The tone is low.",
    "You are a helpful assistant. Answer briefly and exactly.",
] * 20

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)

# family -> (config class name, extra config, save options)
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING), {}),
    "llama_linear_bf16": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), {"bf16": True}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0), {}),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False), {}),
    "mistral": ("MistralConfig", dict(sliding_window=None), {"shard": True}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    demo.train_tokenizer(CORPUS, d, vocab_size=400)
    return d


def build_hf(family: str, folder: Path, tokenizer_dir: Path, seed: int = 0, **config):
    """Write a random transformers model of `family` (its config changed by `config`) to `folder`; return the
    (fp32) transformers model."""
    import shutil

    import transformers

    cls_name, extra, opts = FAMILIES[family]
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    cfg = getattr(transformers, cls_name)(vocab_size=vocab, **COMMON, **{**extra, **config})
    torch.manual_seed(seed)
    arch = cls_name.replace("Config", "ForCausalLM")
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random biases and norms, so that parity tests see them
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    saved = hf.to(torch.bfloat16) if opts.get("bf16") else hf
    saved.save_pretrained(folder, max_shard_size="40KB" if opts.get("shard") else "5GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return hf.float()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, tokenizer_dir):
    """family -> (folder, transformers model in fp32 with the weights as stored)."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        out[fam] = (d, build_hf(fam, d, tokenizer_dir))
    return out


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo (same generator as the README's, fewer samples) shared by the data and training tests."""
    return demo.make_demo(tmp_path_factory.mktemp("demo"), n_train=48, n_val=12, pretrain_steps=2)


def demo_config(demo_dir, out_dir, **sections):
    """A Config on the small demo; `sections` override keys: demo_config(d, o, train={"max_steps": 4})."""
    cfg = Config()
    cfg.model.llm, cfg.model.aligner = str(demo_dir / "llm"), str(demo_dir / "aligner-init")
    cfg.model.chat_format = "chatml"
    cfg.data.train_file, cfg.data.val_file = str(demo_dir / "data/train.jsonl"), str(demo_dir / "data/val.jsonl")
    cfg.data.max_len = 128
    cfg.lora.rank, cfg.lora.dropout = 4, 0.1
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 4, 4, 2
    cfg.train.eval_every, cfg.train.save_every, cfg.train.gen_samples = 0, 0, 4
    cfg.run.out_dir, cfg.run.log_every = str(out_dir), 1
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    check_config(cfg)
    return cfg


def align_config(demo_dir, out_dir, **sections):
    """A Phase-1 Config on the small demo's pairs; `sections` as in `demo_config`."""
    train_keys = {"phase": "align", "align_encoders": True, "batch_size": 6, "lr_aligner": 5e-3,
                  **sections.pop("train", {})}
    data_keys = {"train_file": str(demo_dir / "data/pairs_train.jsonl"),
                 "val_file": str(demo_dir / "data/pairs_val.jsonl"), "max_len": 32, **sections.pop("data", {})}
    return demo_config(demo_dir, out_dir, train=train_keys, data=data_keys, **sections)


QWEN25_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}


def randomize_lora(llm, seed=0):
    """LoRA's B away from zero, so that the adapters change the outputs."""
    from lora import lora_modules
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(llm).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def rows(out_dir, split="train"):
    """The rows of a run's metrics.jsonl of one split."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def snapshot(folder):
    """Every file below `folder` and its bytes: what a refused command must leave as it was."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def cut_tokenizer(source, folder):
    """A copy of the LLM folder `source` in `folder`, its tokenizer.json cut short: that file's path."""
    import shutil
    shutil.copytree(source, folder)
    tok = Path(folder) / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:300])
    return tok


def final_weights(out_dir):
    """The trainable tensors of a run's latest checkpoint."""
    from safetensors.torch import load_file
    ckpt = Path(out_dir) / "checkpoints"
    return load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "trainable.safetensors"))


def cli_args(cfg):
    """The config as command-line overrides, for runs in a subprocess."""
    return [f"--{s}.{k}={v}" for s, sub in dataclasses.asdict(cfg).items() for k, v in sub.items()]


def toml_file(cfg, path):
    """The config as a TOML file (what launch.sh takes): `path`."""
    lines = []
    for section in ("model", "lora", "data", "train", "run"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in vars(getattr(cfg, section)).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch_sh(cfg, folder, name, *args, **env) -> subprocess.Popen:
    """bash launch.sh on `cfg` (written to `folder`/`name`.toml, given by that relative path; one CPU process), run
    from `folder` in a session of its own, its output on .stdout."""
    toml_file(cfg, folder / f"{name}.toml")
    return subprocess.Popen(["bash", str(ROOT / "launch.sh"), f"{name}.toml", *args], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "NPROC_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "", **env})


def torchrun(args, nproc, script=ROOT / "train.py", env=None, timeout=240):
    """`script` under torchrun with `nproc` gloo ranks; the finished process (a rank that aborts prints its Python
    stack)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})})


def small_bench(device: str, **flags):
    """bench.py's setup on a small shape: its args (batch 2 x 128 tokens, `flags` set), config and model."""
    import argparse

    import bench
    args = argparse.Namespace(**{**bench.workload(128, compile=False), "batch": 2, "compile_mode": "", **flags})
    return (args, *bench.bench_model(args, device, bench.TINY, bench.TINY_ALIGNER))


@pytest.fixture(scope="session")
def trained_run(demo_dir, tmp_path_factory):
    """A short run on the small demo (evaluated at its end on the whole val set), shared by the tests that use a
    trained model: its out_dir."""
    import train
    out = tmp_path_factory.mktemp("trained_run")
    cfg = demo_config(demo_dir, out, lora={"dropout": 0.0}, train={"max_steps": 6, "gen_samples": 12,
                                                                   "lr_lora": 2e-2, "lr_projector": 1e-2})
    train.fit(cfg)
    return out

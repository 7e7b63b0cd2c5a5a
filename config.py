"""The run's configuration: one dataclass per TOML section ([model], [lora], [data], [train], [run]), every key with
its default and a comment, type-checked overrides and checks that name the key at fault.

    cfg = load_config("configs/demo.toml", ["--train.max_steps=20", "--run.out_dir=runs/x"])
    cfg = config_from_dict(json.load(open("runs/x/config.json")), "runs/x/config.json")   # a run's own config

An unknown key is an error that lists the known ones; a value of the wrong type, or one outside what is allowed,
is an error that says what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    llm: str = ".cache/demo/llm"  # Hugging Face folder of the LLM (config.json, safetensors, tokenizer.json)
    aligner: str = ".cache/demo/align/aligner"  # Phase-1 aligner folder (aligner.json + aligner.safetensors)
    chat_format: str = ""  # "" = from tokenizer_config.json's template or the family; or chatml, qwen2.5, llama3, ...
    dtype: str = "auto"  # frozen LLM weights: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16
    quantize: str = "none"  # "nf4": QLoRA, the decoder layers' linear weights in 4-bit NormalFloat (quant.py), read
    # and quantized tensor by tensor; lm_head and the embeddings stay in model.dtype
    quant_block: int = 64  # values per NF4 block (one absmax each), a power of two dividing every layer's width
    double_quant: bool = True  # the blocks' absmax values quantized too (int8, a scale per 256)
    image_tokens: int = 16  # K: LLM tokens per image
    audio_tokens: int = 8  # K: LLM tokens per audio clip
    projector_hidden: int = 0  # width of the projector's middle layer; 0 = the LLM's hidden size
    projector_mode: str = "pool"  # pool: N encoder tokens pooled to K; pooled: the pooled embedding repeated K times
    shared_projector: bool = False  # one projector for images and audio (ImageBind-LLM's design: what it learns on
    # one modality applies to the other through the aligned space); needs image_tokens == audio_tokens
    loss_chunk: int = 512  # labelled positions per lm_head chunk in the loss: one chunk's logits (chunk x vocab) and
    # their gradient are the step's largest temporary; smaller chunks read the lm_head weight more often (BENCHMARKS.md)

    @property
    def tokens_per_media(self) -> dict[str, int]:
        return {"image": self.image_tokens, "audio": self.audio_tokens}


@dataclass
class LoRAConfig:
    rank: int = 16  # r
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the LoRA input
    targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names, or all-linear


@dataclass
class DataConfig:
    train_file: str = ".cache/demo/data/train.jsonl"  # JSONL or JSON list of conversations
    val_file: str = ".cache/demo/data/val.jsonl"  # validation set ("" = none)
    make_demo: str = ""  # folder in which to make the embedded demo assets on first use ("" = never)
    max_len: int = 512  # tokens per sample (and per packed row)
    truncate: bool = False  # cut samples longer than max_len (never inside a media block) instead of an error
    pack: bool = False  # pack several samples per row, with no attention across them
    on_error: str = "raise"  # bad sample: raise (stop, naming it) or skip (leave out, list in skipped.jsonl)
    allow_outside_paths: bool = False  # allow media paths outside the data file's folder
    feature_cache: str = ""  # folder of cached aligner features (train.py --build_feature_cache makes it)
    num_workers: int = 0  # DataLoader worker processes per rank
    pad_multiple: int = 8  # pad rows to a multiple of this many tokens (64 keeps compiled shapes few)
    max_audio_windows: int = 1  # a clip longer than the aligner's window becomes up to this many windows of K tokens


@dataclass
class TrainConfig:
    phase: str = "instruct"  # instruct: Phase 2 (projectors + LoRA on conversations); align: Phase 1 (the aligner
    # on pairs, align.py), which writes <out_dir>/aligner/
    batch_size: int = 8  # samples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in all
    lr_projector: float = 1e-3  # peak learning rate of the projectors
    lr_lora: float = 2e-4  # peak learning rate of the LoRA adapters
    lr_aligner: float = 1e-3  # Phase 1: peak learning rate of the aligner's heads (and encoders) and the text head
    align_encoders: bool = False  # Phase 1: train our own encoders too, not only the heads (HF towers stay frozen)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear warmup, then cosine decay to min_lr_ratio * peak
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    amp: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with GradScaler), fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant)
    offload_activations: bool = False  # with activation_checkpointing: each layer's input waits in host memory
    # (pinned) between the forward and the recomputation, not on the GPU (eager only; the copies cost time)
    compile: str = "none"  # torch.compile per decoder layer: none, default, reduce-overhead (CUDA graphs per layer),
    # max-autotune (searched Triton matmul kernels, CUDA graphs per layer), max-autotune-no-cudagraphs
    cuda_graph: bool = False  # each batch shape's whole step recorded as one CUDA graph and replayed (GPU, bf16/fp32;
    # see GraphedStep)
    activation_memory_budget: float = 1.0  # with train.compile: below 1, the compiler saves fewer activations for the
    # backward and recomputes cheap elementwise work there (norms, activations, RoPE) instead: less memory, more work
    strategy: str = "ddp"  # ddp: every rank holds the whole model; fsdp: torch's FSDP2 shards the LLM's weights over
    # the ranks (each decoder layer a unit), for bases too big for one GPU (torchrun with 2 or more ranks)
    fsdp_reshard_after_forward: bool = True  # fsdp: free each layer's gathered weights after its forward (less
    # memory; the backward gathers them again)
    eval_every: int = 200  # steps between evaluations (0 = only at the end)
    eval_samples: int = 0  # validation samples for the loss (0 = all)
    gen_samples: int = 64  # validation samples answered by greedy generation (exact-match accuracy)
    max_new_tokens: int = 8  # tokens generated per answer
    save_every: int = 200  # steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # periodic checkpoints kept
    resume: str = "auto"  # auto (latest in out_dir), none, or a checkpoint folder
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    seed: int = 0  # seed of the data order, initialisation and dropout
    objective: str = "sft"  # Phase 2's loss: sft (next-token loss on the replies) or dpo (preference tuning on chosen /
    # rejected answers, dpo.py; data files in TRL's preference form; needs init_from)
    init_from: str = ""  # a Phase-2 run, checkpoint or export to start from: its LoRA merged into the base (kept as a
    # frozen adapter on an NF4 or sharded base), its projectors loaded; new LoRA adapters train on top
    dpo_beta: float = 0.1  # dpo: beta, how far the policy may move from the reference (IPO's tau)
    dpo_loss: str = "sigmoid"  # dpo: sigmoid (DPO, arXiv 2305.18290) or ipo (IPO, arXiv 2310.12036, per token)
    dpo_label_smoothing: float = 0.0  # dpo, sigmoid: the chance that a pair's preference is flipped (cDPO), in [0, 0.5)
    rpo_alpha: float = 0.0  # dpo: weight of an SFT term on the chosen answers (RPO, arXiv 2404.19733); 0 = off


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # checkpoints, metrics.csv/jsonl, config.json, logs
    log_every: int = 10  # steps between progress lines and metric rows
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    peak_tflops: float = 0.0  # one GPU's peak, for the MFU column; 0 = its maker's dense bf16 figure for the GPUs
    # metrics.py knows (H100, H200, A100, ...), else no MFU
    trackers: list[str] = field(default_factory=list)  # experiment trackers fed by rank 0 with every metrics row, e.g.
    # ["mlflow", "tensorboard", "wandb"] (track.py): mlflow (MLFLOW_TRACKING_URI, else <out_dir>/mlflow.db),
    # tensorboard (<out_dir>/tensorboard), wandb (<out_dir>/wandb; WANDB_MODE=offline honoured); each an optional
    # pip install (requirements-track.txt). [] = none, nothing imported
    tracker_project: str = "mmlora"  # MLflow experiment and W&B project; the run is named after out_dir's folder
    tracker_samples: int = 8  # validation answers per evaluation sent to the trackers as a table, with their media
    tracker_artifacts: str = "light"  # sent at the end to MLflow and W&B: light (config.json and the export folder
    # without merged/, which is the base's size), all (with merged/), none
    alert_command: str = ""  # shell command run on an alert, the event as JSON on stdin and in MMLORA_EVENT,
    # MMLORA_LEVEL, MMLORA_MESSAGE, MMLORA_STEP, MMLORA_RUN_DIR ("" = alerts are log lines only)
    alert_spike: float = 3.0  # alert when a logged loss exceeds this many times its moving average (0 = never)
    alert_stall_s: float = 1800.0  # alert when no step ends for this many seconds (0 = never)
    alert_slow: float = 0.25  # alert when tokens/s falls below this share of the run's median (0 = never)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {("train", "phase"): ("instruct", "align"), ("train", "objective"): ("sft", "dpo"),
           ("train", "dpo_loss"): ("sigmoid", "ipo"), ("model", "dtype"): ("auto", "float32", "bfloat16"),
           ("model", "projector_mode"): ("pool", "pooled"),
           ("model", "quantize"): ("none", "nf4"),
           ("data", "on_error"): ("raise", "skip"), ("train", "amp"): ("auto", "bf16", "fp16", "fp32"),
           ("train", "compile"): ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
           ("run", "device"): ("auto", "cpu", "cuda"), ("train", "strategy"): ("ddp", "fsdp"),
           ("run", "tracker_artifacts"): ("light", "all", "none")}


TRACKERS = ("mlflow", "tensorboard", "wandb")  # what run.trackers may name: track.py's, each by the package it needs


POSITIVE = {("lora", "rank"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "max_steps"),
            ("data", "max_len"), ("model", "image_tokens"), ("model", "audio_tokens"), ("model", "loss_chunk"),
            ("run", "log_every"), ("data", "pad_multiple"), ("train", "keep_last"), ("train", "max_bad_steps"),
            ("data", "max_audio_windows")}


NON_NEGATIVE = {("train", "lr_projector"), ("train", "lr_lora"), ("train", "lr_aligner"), ("train", "weight_decay"),
                ("train", "warmup_steps"),
                ("train", "grad_clip"), ("lora", "dropout"), ("train", "eval_every"), ("train", "save_every"),
                ("train", "eval_samples"), ("train", "gen_samples"), ("data", "num_workers"), ("run", "peak_tflops"),
                ("run", "tracker_samples"), ("run", "alert_spike"), ("run", "alert_stall_s"), ("run", "alert_slow"),
                ("train", "rpo_alpha")}


def set_key(cfg: Config, section: str, key: str, value, source: str) -> None:
    """Set `section.key`, checking that both exist and that the value has the field's type."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"{source}: unknown section [{section}]; known sections: {', '.join(sections)}")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise ValueError(f"{source}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(fields)}")
    typ = type(getattr(type(sub)(), key))
    if source == "command line" and typ is list:  # --run.trackers=mlflow,tensorboard, or ["mlflow", "tensorboard"]
        value = [v.strip().strip("'\"") for v in value.strip().removeprefix("[").removesuffix("]").split(",")]
        value = [v for v in value if v]
    elif source == "command line" and typ is not str:  # text to parse
        try:
            value = {"true": True, "false": False}[value.lower()] if typ is bool else typ(value)
        except (KeyError, ValueError):
            raise ValueError(f"{source}: {section}.{key} must be {typ.__name__}, got {value!r}") from None
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise ValueError(f"{source}: {section}.{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is list and not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: {section}.{key} must be a list of strings, got {value!r}")
    setattr(sub, key, value)


def check_config(cfg: Config) -> None:
    """Reject impossible values and combinations, naming the keys and what is allowed."""
    check_values(cfg)
    check_trackers(cfg.run.trackers)
    check_step_graph(cfg)
    check_memory(cfg)
    check_fsdp(cfg)
    check_media_tokens(cfg)
    check_objective(cfg)


def check_values(cfg: Config) -> None:
    """Each key on its own: a finite number, one of its choices, in its range."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise ValueError(f"{section.name}.{f.name} = {value}; it must be a finite number")
    for (s, k), allowed in CHOICES.items():
        if getattr(getattr(cfg, s), k) not in allowed:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)!r}; allowed: {', '.join(allowed)}")
    for s, k in POSITIVE:
        if getattr(getattr(cfg, s), k) < 1:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)}; it must be at least 1")
    for s, k in NON_NEGATIVE:
        if getattr(getattr(cfg, s), k) < 0:
            raise ValueError(f"{s}.{k} = {getattr(getattr(cfg, s), k)}; it must be >= 0")
    if not 0.0 <= cfg.train.activation_memory_budget <= 1.0:
        raise ValueError(f"train.activation_memory_budget = {cfg.train.activation_memory_budget}; it must be in [0, 1]")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio = {cfg.train.min_lr_ratio}; it must be in [0, 1]")
    if cfg.run.alert_slow >= 1.0:
        raise ValueError(f"run.alert_slow = {cfg.run.alert_slow}; it must be below 1 (a share of the median tokens/s)")
    if cfg.lora.dropout >= 1.0:
        raise ValueError(f"lora.dropout = {cfg.lora.dropout}; it must be in [0, 1)")


def check_step_graph(cfg: Config) -> None:
    """train.cuda_graph: what recording the whole step (step_graph.py) cannot record."""
    if not cfg.train.cuda_graph:
        return
    if cfg.train.compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.cuda_graph records the whole step, so the layers cannot record graphs of their "
                         f"own (train.compile = \"{cfg.train.compile}\" records them): use \"default\" or "
                         "\"max-autotune-no-cudagraphs\" (or none) with it")
    if cfg.train.amp == "fp16":
        raise ValueError("train.cuda_graph cannot record fp16's loss scaling (it reads the host); use amp = bf16")
    if cfg.data.pack:
        raise ValueError("train.cuda_graph needs batches of few shapes, and packed rows vary in number: "
                         "set data.pack = false with it")
    if cfg.train.phase == "align":
        raise ValueError("train.cuda_graph records Phase 2's step; set it to false with train.phase = \"align\"")


def check_memory(cfg: Config) -> None:
    """train.offload_activations and model.quantize = "nf4": what they need."""
    if cfg.train.offload_activations and not cfg.train.activation_checkpointing:
        raise ValueError("train.offload_activations moves each checkpointed layer's input to host memory: set "
                         "train.activation_checkpointing = true with it")
    if cfg.train.offload_activations and (cfg.train.compile != "none" or cfg.train.cuda_graph):
        raise ValueError("train.offload_activations copies each layer's input to host memory from Python, which a "
                         "compiled layer or a recorded step does not hold: set train.compile = \"none\" and "
                         "train.cuda_graph = false with it")
    if cfg.model.quantize == "nf4" and cfg.model.dtype == "float32":
        raise ValueError("model.quantize = \"nf4\" dequantizes into bf16 for its matmuls (QLoRA's compute dtype): "
                         "set model.dtype = \"bfloat16\" or \"auto\" with it, or model.quantize = \"none\"")


def check_fsdp(cfg: Config) -> None:
    """train.strategy = "fsdp": what sharding the base excludes."""
    if cfg.train.strategy != "fsdp":
        return
    if cfg.model.quantize == "nf4":
        raise ValueError("model.quantize = \"nf4\" with train.strategy = \"fsdp\" is refused: FSDP2 shards parameters, "
                         "and NF4 weights are packed uint8 buffers it does not shard or gather: use "
                         "train.strategy = \"ddp\" (one process per GPU, each with the whole 4-bit base)")
    if cfg.train.cuda_graph:
        raise ValueError("train.strategy = \"fsdp\" gathers and frees weights with collectives around each layer, "
                         "which a recorded step cannot hold: set train.cuda_graph = false with it")
    if cfg.train.compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.compile = \"{cfg.train.compile}\" records each layer as a CUDA graph, and FSDP's "
                         "gathered weights move from step to step (every step would record again): use \"default\" "
                         "or \"max-autotune-no-cudagraphs\" with train.strategy = \"fsdp\"")
    if cfg.train.phase == "align":
        raise ValueError("train.strategy = \"fsdp\" shards Phase 2's LLM; Phase 1 trains the aligner's small heads "
                         "with the LLM frozen and runs with ddp: set train.strategy = \"ddp\"")


def check_media_tokens(cfg: Config) -> None:
    """Where the media's features come from and the tokens they take: no cache in Phase 1 (it trains the aligner),
    one count for a shared projector, and a block that fits data.max_len."""
    if cfg.train.phase == "align" and cfg.data.feature_cache:
        raise ValueError("train.phase = \"align\" trains the aligner, so its features cannot come from a cache: "
                         "set data.feature_cache = \"\"")
    if cfg.model.shared_projector and cfg.model.image_tokens != cfg.model.audio_tokens:
        raise ValueError(f"model.shared_projector gives images and audio one projector, so model.image_tokens "
                         f"({cfg.model.image_tokens}) and model.audio_tokens ({cfg.model.audio_tokens}) must be equal")
    longest = max(cfg.model.image_tokens, cfg.model.audio_tokens)
    if cfg.data.max_len <= longest:
        raise ValueError(f"data.max_len = {cfg.data.max_len} cannot hold one media block of {longest} tokens "
                         "(model.image_tokens / model.audio_tokens); raise data.max_len")


def check_trackers(names: list[str]) -> None:
    """A ValueError naming what to install, or what is allowed, unless every tracker named is known and installed
    (its package found, not imported)."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"run.trackers: unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS)}")
    missing = [n for n in dict.fromkeys(names) if importlib.util.find_spec(n) is None]
    if missing:
        raise ValueError(f"run.trackers names {', '.join(missing)}, not installed here: pip install "
                         f"{' '.join(missing)} (or pip install -r requirements-track.txt)")


def check_objective(cfg: Config) -> None:
    """train.objective = "dpo" and train.init_from: what they need and what they exclude."""
    t = cfg.train
    if t.init_from and t.phase == "align":
        raise ValueError("train.init_from starts Phase 2 from an earlier Phase-2 run; Phase 1 "
                         "(train.phase = \"align\") trains the aligner: set train.init_from = \"\"")
    if t.objective != "dpo":
        return
    if t.phase == "align":
        raise ValueError("train.objective = \"dpo\" tunes Phase 2's model on preferences; set "
                         "train.phase = \"instruct\"")
    if not t.init_from:
        raise ValueError("train.objective = \"dpo\" starts from a Phase-2 run: set train.init_from to its run folder, "
                         "a checkpoint of it or its export (its model is DPO's reference)")
    if t.dpo_beta <= 0:
        raise ValueError(f"train.dpo_beta = {t.dpo_beta}; it must be > 0")
    if not 0.0 <= t.dpo_label_smoothing < 0.5:
        raise ValueError(f"train.dpo_label_smoothing = {t.dpo_label_smoothing}; it must be in [0, 0.5)")
    if t.dpo_label_smoothing and t.dpo_loss == "ipo":
        raise ValueError("train.dpo_label_smoothing smooths the sigmoid loss; IPO has none: set it to 0 with "
                         "train.dpo_loss = \"ipo\"")
    if cfg.data.pack:
        raise ValueError("train.objective = \"dpo\" runs each answer as a row of its own (chosen and rejected side by "
                         "side): set data.pack = false")
    if t.compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.compile = \"{t.compile}\" records each layer as a CUDA graph, and the DPO step runs "
                         "the layers twice (the reference, then the policy), so the second replay overwrites what the "
                         "first recorded: use train.compile = \"default\" or \"none\" with train.objective = \"dpo\"")


def config_from_dict(doc: dict, source: str, cfg: Config | None = None) -> Config:
    """{section: {key: value}} (a TOML file, or a run's config.json) onto `cfg` (default: the defaults), each key's
    name and type checked (the rules across keys are `check_config`'s)."""
    cfg = cfg or Config()
    for section, values in doc.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: {section!r} must be a [section]; sections: model, lora, data, train, run")
        for key, value in values.items():
            set_key(cfg, section, key, value, source)
    return cfg


def load_config(path: str | None, overrides: list[str]) -> Config:
    """TOML file, then `--section.key=value` overrides; unknown keys and wrong types are errors."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        config_from_dict(doc, path, cfg)
    for o in overrides:
        if not o.startswith("--") or "=" not in o or "." not in o.split("=", 1)[0]:
            raise ValueError(f"override {o!r}: write --section.key=value")
        name, value = o[2:].split("=", 1)
        section, key = name.split(".", 1)
        set_key(cfg, section, key, value, "command line")
    check_config(cfg)
    return cfg

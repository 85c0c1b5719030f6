"""The typed configuration tree of a run: one source of truth for every setting.

Each field carries its documentation (``doc`` metadata); ``python -m xtra_ds.config --describe``
prints the tree. Recipes in ``ds_configs/*.yaml`` set any subset of these keys; everything
else keeps the defaults below. Values that can be derived (gradient accumulation, the
DeepSpeed dict, steps per epoch) are derived, never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def setting(default: Any, doc: str):
    """A config field: its default and its documentation (what ``--describe`` prints)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name: str = setting("xtra_vit_tiny_patch16", "named variant: xtra_vit_{tiny,small,base,large,huge,giant}_"
                                                 "patch{14,16}")
    img_size: int = setting(0, "input resolution in pixels; 0 = the variant's paper default (256 for /16, 224 for /14)")
    block_size: int = setting(4, "k: a block is k×k patches; must divide the patch grid (k=1 is plain raster-causal)")
    drop_path: float = setting(0.0, "stochastic depth of the encoder's last block (rises linearly from 0)")
    grad_checkpointing: bool = setting(False, "recompute each block in the backward pass (saves activations)")
    attention: str = setting("sdpa", "attention kernel: 'sdpa' (dense mask, runs everywhere), 'flex' (block-sparse, "
                                     "compiled; GPUs), 'sdpa_cudnn' or 'sdpa_efficient' (one SDPA backend forced)")
    pred_depth: int = setting(0, "predictor depth; 0 = the variant default (8)")
    head_hidden: int = setting(0, "hidden width of the pixel head MLP; 0 = the variant default")
    overrides: dict = setting({}, "further XTRASizes fields to override (advanced), e.g. {dim: 256}")


@dataclass
class ObjectiveConfig:
    loss: str = setting("mse", "'mse' (paper) or 'l1' on normalised block pixels")
    heads_ahead: int = setting(1, "n pixel heads predicting blocks i+1..i+n; their losses are averaged")
    block_order: str = setting("raster", "'raster' (paper) or 'random': one of the fixed pseudo-random orders per step")
    num_block_orders: int = setting(16, "how many fixed pseudo-random block orders to draw from (distinct prefixes)")


@dataclass
class DataConfig:
    train: str = setting("", "training shards: a data_prep manifest.json URL (or its folder) or a brace pattern "
                         "(…/train-{000000..000099}.tar)")
    sources: list = setting([], "several training sources with sampling weights, instead of data.train: "
                                "[{url: s3://a/manifest.json, weight: 1.0}, {url: …, weight: 0.5}]")
    storage_options: dict = setting({}, "fsspec options for object storage, e.g. {endpoint_url: http://minio:9000}")
    num_workers: int = setting(4, "loader worker processes per rank")
    streams: int = setting(0, "canonical streams the epoch is cut into; every step takes global_batch / streams "
                              "images from each, so the data order is the same on any number of ranks and "
                              "workers. Must divide optim.global_batch_size; 0 = one per image of the global batch")
    shuffle_buffer: int = setting(64, "in-stream shuffle: consecutive samples of a stream permuted together. "
                                      "A rank holds (its streams) × this many undecoded samples")
    on_order_change: str = setting("refuse", "resuming when the data order changed (shards, seed, global batch, "
                                             "data.streams): 'refuse' with the reason, or 'next_epoch': go on at "
                                             "the next epoch, leaving the rest of the saved one unread (logged)")
    quarantine: str = setting("", "a file (local or fsspec URL) of sample keys the loader leaves out from the next "
                                  "(re)start on, one per line, optionally followed by the shard that holds it (what "
                                  "launchers/replay.py --write-quarantine writes). It changes the data order: a "
                                  "resume across a change is refused unless data.on_order_change=next_epoch")
    jpeg_draft: bool = setting(True, "decode large JPEGs at 1/2–1/8 scale when the crop allows (faster, "
                                     "near-identical)")
    crop_scale: list = setting([0.3, 1.0], "RandomResizedCrop area range (paper: 0.3–1.0)")
    crop_ratio: list = setting([0.75, 1.5], "RandomResizedCrop aspect-ratio range (paper: 0.75–1.5)")
    hflip: float = setting(0.5, "horizontal flip probability")
    max_sample_bytes: int = setting(64_000_000, "a tar member larger than this stops the loader with an error "
                                                "naming it (data_prep rejects larger inputs by default)")
    samples_per_epoch: int = setting(0, "samples that make one epoch of schedule.epochs / warmup_epochs and "
                                        "train/epoch (e.g. the paper's 1281167); 0 = the training data's usable "
                                        "samples (Σ weight × samples of each source)")


@dataclass
class OptimConfig:
    global_batch_size: int = setting(2088, "images per optimizer step over all ranks (paper: 2088 = 29 × 72 GPUs)")
    micro_batch_size: int = setting(29, "images per rank per forward/backward; accumulation is derived")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    betas: list = setting([0.9, 0.95], "AdamW betas")
    eps: float = setting(1e-8, "AdamW epsilon")
    weight_decay: float = setting(0.05, "decoupled weight decay on every tensor but biases and 1-D tensors "
                                        "(position embeddings are decayed, as in the reference)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this value (0 = off)")


@dataclass
class ScheduleConfig:
    epochs: float = setting(800, "training length in epochs of data.samples_per_epoch")
    total_steps: int = setting(0, "training length in optimizer steps; overrides epochs when > 0")
    warmup_epochs: float = setting(15, "linear warmup length in epochs")
    warmup_steps: int = setting(0, "linear warmup length in steps; overrides warmup_epochs when > 0")
    warmup_start_lr: float = setting(1e-4, "learning rate at step 0; rises linearly to optim.lr")
    final_lr: float = setting(1e-6, "learning rate at the end of the cosine decay")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = setting(3, "ZeRO stage (0–3); 3 partitions parameters, gradients and optimizer state")
    precision: str = setting("bf16", "'bf16' (bf16 weights and gradients, fp32 master copy in the optimizer), "
                                     "'bf16-mixed' (fp32 weights, autocast: norms, softmax and loss in fp32; "
                                     "Linear/Conv weights gathered in bf16), 'fp16' or 'fp32'")
    overlap_comm: bool = setting(True, "overlap reduce-scatter / all-gather with compute")
    contiguous_gradients: bool = setting(True, "copy gradients into a contiguous buffer as they are produced")
    reduce_bucket_size: int = setting(50_000_000, "elements per gradient reduction bucket")
    prefetch_bucket_size: int = setting(50_000_000, "ZeRO-3: elements of parameters prefetched ahead of use")
    param_persistence_threshold: int = setting(100_000, "ZeRO-3: parameters smaller than this stay unpartitioned")
    max_live_parameters: int = setting(1_000_000_000, "ZeRO-3: cap on gathered parameters alive at once")
    zero3_leaf_blocks: bool = setting(True, "ZeRO-3: gather each transformer block (encoder and predictor) as one "
                                            "unit: one fetch, one release and one pair of hooks per block instead of "
                                            "one per Linear/LayerNorm inside it (DeepSpeed's zero_optimization."
                                            "leaf_module); false: per submodule, DeepSpeed's default")
    zero_hpz_partition_size: int = setting(1, "ZeRO++ hpZ (ZeRO-3): also keep parameters partitioned within "
                                              "groups of this many ranks of a node, for the backward's gathers "
                                              "(1 = off; must divide the ranks per node)")
    zero_quantized_weights: bool = setting(False, "ZeRO++ qwZ (ZeRO-3, CUDA): gather parameters as int8")
    zero_quantized_gradients: bool = setting(False, "ZeRO++ qgZ (ZeRO-3, CUDA, several nodes): reduce gradients "
                                                    "as int4 through a node-then-cluster all-to-all")
    extra: dict = setting({}, "raw DeepSpeed keys merged last into the derived dict (escape hatch)")


@dataclass
class LoggingConfig:
    log_every: int = setting(10, "steps between console lines and TensorBoard scalars")
    recon_every: int = setting(500, "steps between reconstruction images in TensorBoard (0 = never)")
    tb_dir: str = setting("tb", "TensorBoard directory, relative to run_dir")
    attn_every: int = setting(100, "steps between attention-health samples: each layer's largest attention logit "
                                   "and mean entropy, from one extra forward of one micro batch (0 = never)")
    verbose: bool = setting(False, "also print what libraries log (DeepSpeed's INFO lines, torch's warnings) on the "
                                   "console; it always goes to run_dir/logs/rank<R>.log")
    attn_logit_warn: float = setting(100.0, "warn on the console when a layer's largest attention logit passes this "
                                            "(attention logits that keep growing precede divergence)")


@dataclass
class IncidentsConfig:
    """When a step is recorded for forensics (``run_dir/incidents/``; docs/TRAINING.md, "When a run misbehaves")."""

    spike_z: float = setting(8.0, "a loss more than this many robust standard deviations (1.4826 × the median "
                                  "absolute deviation) above the median of the last spike_window steps is a spike; "
                                  "0 = never")
    spike_window: int = setting(200, "steps of loss history the spike test looks at (it starts once a quarter of "
                                     "them, at least 20, are there)")
    hang_timeout_s: float = setting(0.0, "no step completed for this long: every live rank writes its stacks to "
                                         "incidents/hang_<step>/ and the job exits 75 (requeued under Slurm). 0 = 20x "
                                         "the median step time, within [hang_floor_s, 1800], and 1800 for the first "
                                         "5 steps after a start; checkpoints and exports get 1800 s")
    hang_floor_s: float = setting(300.0, "the least a derived hang timeout can be, and the least the first step after "
                                         "a start gets under a fixed one")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(1000, "save a resumable checkpoint every N steps (0 = off)")
    every_minutes: float = setting(30.0, "also save when this many minutes passed since the last save (0 = off)")
    keep_last: int = setting(3, "complete checkpoints to keep")
    resume: str = setting("auto", "'auto' (latest complete checkpoint in run_dir), 'none', or a checkpoint path. A "
                                  "path older than run_dir's newest checkpoint is a rollback: what run_dir holds of "
                                  "later steps is moved to */abandoned-<time>/ at start")
    start_over: bool = setting(False, "with resume=none in a run_dir that holds checkpoints: move them, the exports "
                                      "and the eval records to */abandoned-<time>/ and start from step 0 (without it "
                                      "such a start is refused)")
    export_every: int = setting(5000, "steps between encoder exports for the eval worker (0 = off)")


@dataclass
class EvalConfig:
    """The eval worker's quick probes (``launchers/eval_worker.py``); see docs/EVAL.md."""

    dataset: str = setting("", "name in TensorBoard tags eval/<dataset>/…; default: the val shards' folder name")
    train: str = setting("", "labelled shards to fit probes on (data_prep manifest or brace pattern)")
    val: str = setting("", "labelled shards to score probes on (classes numbered as in train)")
    probes: list = setting(["linear", "attentive"], "quick probes trained per export")
    epochs: int = setting(10, "quick-probe epochs over the cached features")
    lrs: list = setting([3e-3, 1e-2, 3e-2, 1e-1], "learning rates trained side by side; the best is reported")
    batch_size: int = setting(64, "quick-probe batch size")
    weight_decay: float = setting(0.05, "quick-probe AdamW weight decay")
    max_samples: int = setting(0, "use at most this many training images for the probes (0: all)")
    attentive_layers: int = setting(6, "the attentive probe reads the mean of the last N blocks' outputs")
    attentive_heads: int = setting(16, "attention heads of the attentive probe")
    causal: bool = setting(True, "extract features with the block-causal mask the encoder was trained with")
    feature_batch_size: int = setting(128, "images per encoder forward when extracting features")
    storage_retries: int = setting(4, "tries of one export when storage fails (backoff between them) before it is "
                                      "recorded as failed and the worker moves on")
    poll_seconds: float = setting(30.0, "how often the worker looks for new exports")
    max_pending: int = setting(2, "more complete exports than this waiting: evaluate the newest first, back-fill after")
    suite: str = setting("", "several labelled datasets probed on every export, with their mean top-1 "
                             "(eval/suite/<name>/<probe>_top1_mean): a suite file such as "
                             "ds_configs/eval/paper15.yaml, or the name of the suite given inline in eval.datasets")
    datasets: list = setting([], "a suite inline: [{name, train, val, and any eval.* setting of that dataset, e.g. "
                                 "max_samples}]; its name is eval.suite")
    suite_root: str = setting("", "where a suite file's relative train/val paths start (overrides the file's root), "
                                  "e.g. s3://bucket/benchmarks")
    only: list = setting([], "evaluate only these datasets of the suite (e.g. one per job of a Slurm array); the "
                             "suite's mean is written by whichever worker records its last dataset")
    device: str = setting("auto", "where the worker runs: auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    threads: int = setting(0, "CPU threads for the worker (0: a quarter of the cores, at least 1)")


@dataclass
class Config:
    run_dir: str = setting("runs/default", "where checkpoints, exports, TensorBoard logs and config.yaml go")
    seed: int = setting(0, "global seed (data order, init, block orders)")
    env_file: str = setting("", "a file of KEY=VALUE lines (credentials such as AWS_SECRET_ACCESS_KEY) that every "
                                "rank and the eval worker load into their environment at start: never on a command "
                                "line, in a log or in the run directory. The path must exist on every node")
    model: ModelConfig = setting(None, "the network")
    objective: ObjectiveConfig = setting(None, "the XTRA next-block objective")
    data: DataConfig = setting(None, "training data")
    optim: OptimConfig = setting(None, "batch sizes and AdamW")
    schedule: ScheduleConfig = setting(None, "learning-rate schedule and length")
    deepspeed: DeepSpeedConfig = setting(None, "DeepSpeed engine settings")
    logging: LoggingConfig = setting(None, "TensorBoard and console")
    checkpoint: CheckpointConfig = setting(None, "checkpoints, resume and encoder exports")
    incidents: IncidentsConfig = setting(None, "records of non-finite steps and loss spikes for forensics")
    eval: EvalConfig = setting(None, "asynchronous probe evaluation")

    def __post_init__(self):
        # Sections default to their own defaults (dataclass defaults cannot be mutable instances).
        for f in SECTIONS:
            if getattr(self, f) is None:
                setattr(self, f, SECTIONS[f]())


SECTIONS = {
    "model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "deepspeed": DeepSpeedConfig, "logging": LoggingConfig,
    "checkpoint": CheckpointConfig, "incidents": IncidentsConfig, "eval": EvalConfig,
}


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def all_keys() -> list[str]:
    """Every dotted key of the tree (``optim.lr``, ``model.name``, …)."""
    out = []
    for f in fields(Config):
        out += [f"{f.name}.{k}" for k in field_names(SECTIONS[f.name])] if f.name in SECTIONS else [f.name]
    return out

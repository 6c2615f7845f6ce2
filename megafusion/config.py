"""Run configuration: typed dataclasses, loaded from YAML, overridden with ``--set a.b=c``.

Everything a run needs is one :class:`Config`. It is read and validated once, at start-up,
before any process group exists, and then passed down explicitly: no module reads a
global argument object.

    cfg = load_config("examples/configs/tiny_text.yaml", ["train.steps=10", "parallel.tp=2"])
    validate(cfg, world_size=2)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megafusion import config_checks
from megafusion.diffusion.flow import FlowMatchingConfig
from megafusion.settings import ConfigError, describe_type, load_dataclass  # noqa: F401 (re-exported)




# --------------------------------------------------------------------------- sections


@dataclass
class MoEConfig:
    """Mixture of experts in place of the dense FFN (``num_experts: 0`` keeps it dense)."""

    num_experts: int = 0  # routed experts per MoE layer; 0: a dense FFN
    top_k: int = 2  # experts each token is routed to
    ffn_hidden_size: int | None = None  # per expert; null: model.ffn_hidden_size
    # size of the shared expert beside the routed ones (the Transfusion model: one per modality
    # with per_modality_shared_experts); null: no shared expert
    shared_expert_ffn_hidden_size: int | None = None
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # megatron's token dispatcher
    dispatch: Literal["megatron", "triton"] = "megatron"  # the permute implementation
    # routed experts module: megatron (SequentialMLP; TE grouped MLP with spec te) | grouped
    # (megafusion.model.grouped_experts: one grouped GEMM per projection, same checkpoint keys)
    experts: Literal["megatron", "grouped"] = "megatron"
    router_score: Literal["softmax", "sigmoid"] = "softmax"  # how the router turns logits into scores
    aux_loss_coeff: float = 0.0  # load-balancing loss weight (0: none)
    z_loss_coeff: float | None = None  # router z-loss weight (null: none)
    capacity_factor: float | None = None  # tokens an expert takes, relative to an even share; null: dropless
    # Transfusion: a text shared expert for text tokens and a vision one for image/frame
    # tokens (each of size shared_expert_ffn_hidden_size), instead of one global shared expert.
    per_modality_shared_experts: bool = False


@dataclass
class ModelConfig:
    """The network: its kind, sizes and, for the Transfusion model, how images enter it."""

    kind: Literal["text", "transfusion"] = "text"  # which provider builds the model
    spec: Literal["local", "te"] = "local"  # megatron layer spec: local (pure torch) | te (Transformer Engine)
    # the embedding rows (a multiple of parallel.tp); null: the tokenizer's ids, added special tokens
    # included, padded as Megatron pads (a multiple of 128 * parallel.tp)
    vocab_size: int | None = 256
    hidden_size: int = 64  # the width of the residual stream
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention (query) heads
    num_kv_heads: int | None = None  # key/value heads for GQA; null: num_heads (no GQA)
    ffn_hidden_size: int | None = None  # null: 4 * hidden_size
    seq_length: int = 64  # tokens per sample
    activation: Literal["swiglu", "gelu"] = "swiglu"  # the FFN's activation
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # the norm before attention and FFN
    tie_embeddings: bool = True  # the output layer shares the input embedding's weights
    rope_base: float = 10000.0  # the RoPE frequency base
    init_std: float = 0.02  # the std of the initial weights
    attention: Literal["sdpa", "flex", "triton"] = "sdpa"  # core attention backend of the Transfusion model
    moe: MoEConfig = field(default_factory=MoEConfig)
    # ---- Transfusion only (model.kind = text refuses these)
    ffn: Literal["dense", "modality"] = "dense"  # dense: one FFN for all tokens | modality: text / vision FFNs
    patch_adapter: Literal["linear", "unet"] = "linear"  # latent patches in/out
    time_conditioning: Literal["additive", "adaln"] = "additive"  # timestep embedding on image tokens
    image_positions: Literal["1d", "2d", "3d"] = "1d"  # RoPE positions of image/frame patches
    # learned: an absolute embedding of each patch's index inside its image/frame, added to
    # its input, so patches know where they sit whatever the RoPE leaves them
    patch_positions: Literal["none", "learned"] = "none"
    # Initial std of that embedding. Far above init_std on purpose: a patch's input is mostly
    # noise at high flow times, and a weaker position is drowned by it, so patches never learn
    # which caption words describe their place.
    patch_position_init_std: float = 1.0
    # How 2d/3d RoPE shares its frequencies among (time, row, column): contiguous thirds
    # (M-RoPE; time gets the highest) | interleaved (row, column, time, row, ...: the
    # spatial axes get the highest, which small head dims need to tell neighbours apart)
    rope_layout: Literal["contiguous", "interleaved"] = "contiguous"
    # 1d: video frames keep 1-D RoPE positions whatever image_positions says, so the same
    # place in consecutive frames sits a fixed offset apart (what copying a frame attends by)
    frame_positions: Literal["same", "1d"] = "same"
    # previous: each video-frame patch also embeds the clean latent at its place one frame
    # back (world models feed context frames to the denoiser this way: DIAMOND, GameNGen),
    # so what stays put is copied without attention; window: the 3x3 window of clean
    # patches around that place, so a one-patch move needs no attention either (square
    # patch grids)
    frame_conditioning: Literal["none", "previous", "window"] = "none"
    # embedding: each video-frame patch also gets the mean word embedding of the text between
    # the frame before it and it (the action), so which way the agent moves needs no
    # attention to find the latest action among all earlier ones
    action_conditioning: Literal["none", "embedding"] = "none"


@dataclass
class VisionConfig:
    """The visual representation whose latents the Transfusion model diffuses (megafusion.vision)."""

    representation: Literal["pixel", "rae", "vae"] = "pixel"  # what the latents are
    path: str | None = None  # a saved representation directory (rae / vae weights, statistics)
    image_size: int = 16  # pixels per side
    patch_size: int = 4  # pixels per patch side (pixel / vae patchification)


@dataclass
class ParallelConfig:
    """Parallel sizes. Data parallelism is whatever is left of the world size."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    ep: int = 1  # expert-parallel size (MoE models)
    sp: bool = False  # sequence parallelism (needs tp > 1)
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    distributed_optimizer: bool = False  # shard the optimizer state over data-parallel ranks


@dataclass
class OptimizerConfig:
    """AdamW (megatron's optimizer)."""

    lr: float = 1e-3  # the peak learning rate
    min_lr: float = 1e-4  # the learning rate the schedule decays to
    weight_decay: float = 0.1  # decoupled (AdamW) weight decay; 0: none
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator term
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    """The learning rate per step: a linear warmup from 0, then the decay of ``kind``."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"  # wsd: warmup-stable-decay
    warmup_steps: int = 0  # steps of linear warmup from 0 to optimizer.lr
    decay_steps: int | None = None  # the step where the decay reaches min_lr; null: train.steps
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of training decays the LR


@dataclass
class TrainConfig:
    """Steps, batch sizes, numerics and the device."""

    steps: int = 100  # optimizer steps
    micro_batch_size: int = 1  # samples per forward/backward on one data-parallel rank
    global_batch_size: int = 8  # samples per optimizer step (micro-batches accumulate to it)
    seed: int = 1234  # initial weights and data order
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute precision (fp16: dynamic loss scaling)
    recompute: Literal["none", "full", "selective"] = "none"  # activation recomputation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible
    # FP8 matmuls in the Transformer Engine layers (model.spec = te, CUDA, precision bf16):
    # delayed | tensorwise (per-tensor current scaling) | mxfp8 (Blackwell, CC >= 10)
    fp8: Literal["none", "delayed", "tensorwise", "mxfp8"] = "none"
    fp8_params: bool = False  # keep the TE layers' weights in FP8 (less memory; needs train.fp8 and parallel.distributed_optimizer)
    # Steps whose gradients hold NaN/inf are skipped (no update) and counted; after this
    # many the run stops naming the step, rank and first non-finite parameter. None: 0 in
    # fp32/bf16 (a non-finite gradient there is a bug or a blow-up), unlimited in fp16,
    # where the dynamic loss scaler skips and backs off by design.
    max_skipped_steps: int | None = None

    def micro_batches(self, data_parallel_size: int) -> int:
        """Micro-batches each pipeline (data-parallel replica) runs per optimizer step:
        global_batch_size // (data_parallel_size * micro_batch_size); ``data_parallel_size`` is
        world_size // (tp * pp) (:func:`data_parallel_size`), not the expert-data-parallel size."""
        return self.global_batch_size // (data_parallel_size * self.micro_batch_size)


@dataclass
class DataConfig:
    """What the run reads."""

    # synthetic: random text | shapes: ShapesWorld, generated in-process | indexed: data.paths
    # | energon: data.paths are Energon-prepared WebDataset image-caption datasets (+ indexed to blend)
    kind: Literal["synthetic", "indexed", "shapes", "energon"] = "synthetic"
    paths: list[str] = field(default_factory=list)  # indexed datasets (prefixes)
    weights: list[float] = field(default_factory=list)  # blending weights, one per path
    tokenizer: str | None = None  # tokenizer path (indexed / shapes data): a .model file or a HF directory
    # how data.tokenizer is read (Megatron's names): a sentencepiece .model file, or a local
    # Hugging Face tokenizer directory (tokenizer.json); data.tokenizer unset: the byte tokenizer
    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer"] = "SentencePieceTokenizer"
    # Background loading (megafusion.data.loader): worker processes that build steps ahead
    # (null: 2 on CUDA, 0 on CPU, where workers compete with the step for cores)
    num_workers: int | None = None
    prefetch: int = 2  # steps each loading worker keeps ready
    # ShapesWorld mixture weights of its sources (data.kind = shapes)
    shapes_weights: dict[str, float] = field(
        default_factory=lambda: {"text": 1.0, "image_text": 1.0, "video": 0.0, "action_video": 0.0})
    # ShapesWorld vocabulary (data.kind = shapes): simple = 3 colours, 3 shapes, 2x2 grid (the quickstart's)
    shapes_world: Literal["full", "simple"] = "full"
    # ShapesWorld compositions kept out of training (data.kind = shapes): compositions = a fixed few
    # colour x shape pairs, shape x cell placements, object pairs and agent start cells per
    # vocabulary (megafusion.data.shapes.holdout) never drawn in any source, so `megafusion eval`
    # scores them as its unseen split; none = every composition may be drawn (the default: a run
    # directory from before this setting resumes with the data it started with)
    shapes_holdout: Literal["none", "compositions"] = "none"


@dataclass
class CheckpointConfig:
    """Checkpoints under the run directory's checkpoints/."""

    every: int = 0  # save every N steps (0 = only at the end)
    keep: int = 2  # keep the last K complete checkpoints
    async_save: bool = True  # GPU only; CPU saves synchronously
    save_final: bool = True  # save after the last step


@dataclass
class WandbConfig:
    """Weights & Biases, optional: with a project set, rank 0 also logs metrics.jsonl's scalars there."""

    project: str | None = None  # the W&B project; null: no W&B (wandb is imported only when set)
    entity: str | None = None  # the W&B user or team; null: wandb's default entity
    mode: Literal["online", "offline", "disabled"] = "online"  # wandb.init's mode (offline: sync later)


# ShapesWorld captions: what the sample grids draw by default.
DEFAULT_SAMPLE_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a blue circle")


@dataclass
class LoggingConfig:
    """Metrics (metrics.jsonl, the console and TensorBoard)."""

    every: int = 1  # log every N steps (and the last, and any skipped step): metrics.jsonl rows and TensorBoard
    # A console progress line (losses, throughput, elapsed, ETA) every N steps, a multiple of
    # logging.every; null: every logged step. The first logged step, the last, skipped steps and
    # a stop always print. metrics.jsonl keeps every logged step either way.
    console_every: int | None = None
    tensorboard: bool = True  # also write TensorBoard events to the run directory's tensorboard/
    # Every N steps (and at the last) the Transfusion model draws an image for each of
    # logging.sample_prompts and TensorBoard gets them as one grid ("samples"); 0: never. World
    # size 1 only (the training model itself samples, with the training RNG put back after).
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))  # the sample grid's prompts
    sample_steps: int = 10  # ODE steps per sampled image (few: a preview, not an evaluation)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """A whole run, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    diffusion: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file (or starts from defaults), applies ``key.sub=value`` overrides and
    resolves ``model.vocab_size: null`` (:func:`resolve_vocab_size`)."""
    return resolve_vocab_size(load_dataclass(Config, path, overrides, what="a mapping of sections"))


VOCAB_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by default


def resolve_vocab_size(cfg: Config) -> Config:
    """``cfg`` with ``model.vocab_size: null`` replaced by the tokenizer's size (added special
    tokens included) padded to a multiple of ``VOCAB_DIVISIBLE_BY * parallel.tp``, Megatron's
    padding. A tokenizer that cannot be read leaves it null, which ``validate`` reports."""
    if cfg.model.vocab_size is not None:
        return cfg
    try:
        n = config_checks.tokenizer_vocab_size(cfg.data.tokenizer, cfg.data.tokenizer_type)
    except Exception:  # noqa: BLE001 - any library's refusal; validate names the tokenizer
        return cfg
    multiple = VOCAB_DIVISIBLE_BY * max(int(cfg.parallel.tp), 1)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=-(-n // multiple) * multiple))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def config_fields(node: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value, annotated type) of every value of a config (or section), in the
    order of the dataclasses, sections walked into."""
    rows = []
    for name, typ in _field_types(type(node)).items():
        key, value = f"{prefix}{name}", getattr(node, name)
        rows += config_fields(value, key + ".") if dataclasses.is_dataclass(typ) else [(key, value, typ)]
    return rows


def choices_of(typ: Any) -> tuple[Any, ...] | None:
    """The choices of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else None."""
    args = [arg for arg in typing.get_args(typ) if arg is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        typ = args[0]
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def choice_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, message) of each value outside the choices of its ``Literal`` annotation."""
    problems = []
    for key, value, typ in config_fields(cfg):
        choices = choices_of(typ)
        if choices is not None and value is not None and value not in choices:
            problems.append((key, f"{key} = {value!r} is not one of {', '.join(map(str, choices))}"))
    return problems


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """The data-parallel size the batch is split over: world_size // (tp * pp). Not the
    expert-data-parallel size (world_size // (tp * ep * pp)), which only the experts' weights see."""
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


class _Problems:
    """The problems found so far and the keys whose values they refused. A later check that
    reads a refused value is skipped (``ok``), so each problem is named once, by its own key,
    and no check divides by a refused 0."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.refused: set[str] = set()

    def add(self, message: str, key: str | None = None) -> None:
        self.messages.append(message)
        if key is not None:
            self.refused.add(key)

    def ok(self, *keys: str) -> bool:
        """Whether none of ``keys`` (nor a value inside one: ``data.weights[0]``) was refused."""
        return not any(bad == key or bad.startswith((key + ".", key + "["))
                       for bad in self.refused for key in keys)


_AT_LEAST_ONE = ("parallel.tp", "parallel.pp", "parallel.ep", "train.steps", "train.micro_batch_size",
                 "train.global_batch_size", "model.num_layers", "model.num_heads", "model.hidden_size",
                 "model.seq_length", "model.vocab_size")


def problems_error(messages: list[str]) -> ConfigError:
    """One ConfigError naming every problem: one line for one, one line each for several."""
    if len(messages) == 1:
        return ConfigError(f"invalid config: {messages[0]}")
    return ConfigError("invalid config:\n  - " + "\n  - ".join(messages))


def validate(cfg: Config, world_size: int, *, check_memory: bool = True) -> None:
    """Refuses layouts and values that cannot run, settings the run would ignore, and
    steps that cannot fit in the device's memory, naming the numbers involved.

    ``check_memory=False`` skips the coarse device-memory guard: a dry run
    (``megafusion train --dry-run``) plans for a cluster, not for this machine's memory.

    Every problem goes into one message. Values are checked first (choices, finite numbers,
    bounds); a later check that reads a refused value is skipped rather than reporting a
    consequence of it. The memory estimate comes last and only for a config with no other
    problem: it reads the layout that the other checks accept."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    found = _Problems()
    for key, message in _non_finite_problems(cfg) + choice_problems(cfg):
        found.add(message, key)
    if cfg.model.vocab_size is None:  # load_config resolves it from a tokenizer it can read
        found.add(f"model.vocab_size = null (the tokenizer's size, padded) needs a readable data.tokenizer "
                  f"({cfg.data.tokenizer_type} {cfg.data.tokenizer!r}); fix data.tokenizer or give model.vocab_size",
                  "model.vocab_size")
    for key in _AT_LEAST_ONE:
        if _get(cfg, key) is not None and _get(cfg, key) < 1:
            found.add(f"{key} = {_get(cfg, key)} must be at least 1", key)
    for key, message in _bound_problems(cfg):
        found.add(message, key)
    ok, add = found.ok, found.add
    lg = cfg.logging
    if ok("logging.every", "logging.console_every") and lg.console_every is not None and lg.console_every % lg.every:
        add(f"logging.console_every = {lg.console_every} must be a multiple of logging.every = {lg.every} "
            "(a console line shows a logged step's metrics)", "logging.console_every")
    for message in _logging_problems(cfg, world_size, ok):
        add(message)

    dp = None  # the data-parallel size, once the layout allows one
    if ok("parallel.tp", "parallel.pp"):
        model_parallel = p.tp * p.pp
        if world_size % model_parallel != 0:
            add(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp} = "
                f"{model_parallel}; data parallelism takes what is left, so the world size must be a multiple")
        dp = max(world_size // model_parallel, 1)
    kv_heads = m.num_kv_heads or m.num_heads
    if ok("model.num_heads", "parallel.tp") and m.num_heads % p.tp:
        add(f"model.num_heads = {m.num_heads} is not divisible by parallel.tp = {p.tp}")
    if ok("model.num_heads", "model.num_kv_heads"):
        if m.num_heads % kv_heads:
            add(f"model.num_heads = {m.num_heads} is not a multiple of model.num_kv_heads = {kv_heads}")
        if ok("parallel.tp") and kv_heads % p.tp:
            add(f"model.num_kv_heads = {kv_heads} is not divisible by parallel.tp = {p.tp}")
    if ok("model.hidden_size", "model.num_heads") and m.hidden_size % m.num_heads:
        add(f"model.hidden_size = {m.hidden_size} is not divisible by model.num_heads = {m.num_heads}")
    stages = p.pp * (p.vpp or 1)
    if ok("model.num_layers", "parallel.pp") and m.num_layers % stages:
        add(f"model.num_layers = {m.num_layers} is not divisible by parallel.pp * vpp = {stages}")
    if ok("parallel.pp") and p.vpp is not None and p.pp < 2:
        add(f"parallel.vpp = {p.vpp} needs parallel.pp >= 2, got pp = {p.pp}")
    if m.image_positions == "1d":
        for key, value, default in (("rope_layout", m.rope_layout, "contiguous"),
                                    ("frame_positions", m.frame_positions, "same")):
            if ok(f"model.{key}") and value != default:
                add(f"model.{key} = {value} has no effect with model.image_positions = 1d; "
                    f"set model.image_positions to 2d or 3d (or model.{key} to {default})")
    if ok("parallel.tp"):
        if p.sp and p.tp < 2:
            add("parallel.sp = true needs parallel.tp >= 2 (sequence parallelism splits along TP ranks)")
        if p.sp and ok("model.seq_length") and m.seq_length % p.tp:
            add(f"model.seq_length = {m.seq_length} is not divisible by parallel.tp = {p.tp} (needed by sp)")
        if ok("model.vocab_size") and m.vocab_size % p.tp:
            add(f"model.vocab_size = {m.vocab_size} is not divisible by parallel.tp = {p.tp}")

    moe = m.moe
    if moe.num_experts > 0:
        if moe.top_k < 1 or moe.top_k > moe.num_experts:
            add(f"model.moe.top_k = {moe.top_k} must be between 1 and model.moe.num_experts = {moe.num_experts}")
        if ok("parallel.ep") and moe.num_experts % p.ep:
            add(f"model.moe.num_experts = {moe.num_experts} is not divisible by parallel.ep = {p.ep}")
        if ok("parallel.ep") and dp is not None and p.ep > 1 and (dp * p.tp) % p.ep:
            add(f"parallel.ep = {p.ep} must divide data-parallel size * tp = {dp} * {p.tp}")
        if moe.experts == "grouped" and ok("parallel.tp") and p.tp > 1:
            add(f"model.moe.experts = grouped does not shard experts with tensor parallelism (parallel.tp = {p.tp}); "
                "use model.moe.experts = megatron, or parallel.tp = 1 (parallel.ep shards the experts)")
    elif p.ep > 1 and ok("model.moe.num_experts"):
        add(f"parallel.ep = {p.ep} needs a MoE model (model.moe.num_experts > 0)")

    if dp is not None and ok("train.global_batch_size", "train.micro_batch_size"):
        if t.global_batch_size % (t.micro_batch_size * dp):
            add(f"train.global_batch_size = {t.global_batch_size} is not divisible by train.micro_batch_size * "
                f"data-parallel size = {t.micro_batch_size} * {dp}")
        elif p.pp > 1 and p.vpp and t.micro_batches(dp) % p.pp:
            add("interleaved pipelining (parallel.vpp) needs the number of micro-batches to be a "
                f"multiple of parallel.pp = {p.pp}")
    if cfg.data.num_workers is not None and cfg.data.num_workers < 0:
        add(f"data.num_workers = {cfg.data.num_workers} must be >= 0 (0: load in the training process)")
    if cfg.data.prefetch < 1:
        add(f"data.prefetch = {cfg.data.prefetch} must be >= 1 (steps built ahead per worker)")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.paths):
        add(f"data.weights has {len(cfg.data.weights)} entries but data.paths has "
            f"{len(cfg.data.paths)}; give one weight per path")
    decay_steps = cfg.schedule.decay_steps or t.steps
    if ok("schedule.warmup_steps", "schedule.decay_steps", "train.steps") and cfg.schedule.warmup_steps >= decay_steps:
        add(f"schedule.warmup_steps = {cfg.schedule.warmup_steps} must be smaller than the decay "
            f"horizon (schedule.decay_steps or train.steps) = {decay_steps}")
    if ok("optimizer.min_lr", "optimizer.lr") and cfg.optimizer.min_lr > cfg.optimizer.lr:
        add(f"optimizer.min_lr = {cfg.optimizer.min_lr} is larger than optimizer.lr = {cfg.optimizer.lr}")
    if cfg.checkpoint.keep < 1:
        add(f"checkpoint.keep = {cfg.checkpoint.keep} must be at least 1")
    for message in (_data_problems(cfg, ok) + provider_problems(cfg, ok) + _ignored_setting_problems(cfg, ok)
                    + _transformer_engine_problems(cfg, ok)):
        add(message)
    if found.messages:
        raise problems_error(found.messages)
    if not check_memory:
        return
    # Last: the estimate reads the layout that the checks above have accepted.
    from megafusion.training.memory import memory_problem

    problem = memory_problem(cfg, world_size)
    if problem:
        raise ConfigError(f"invalid config: {problem}")


def _logging_problems(cfg: Config, world_size: int, ok: Callable[..., bool]) -> list[str]:
    """Sample grids need a Transfusion model that one process holds whole; W&B needs wandb."""
    lg, p = cfg.logging, cfg.parallel
    problems = []
    if ok("logging.sample_every", "model.kind") and lg.sample_every > 0:
        why = "the training model itself samples, whole, in one process"
        if cfg.model.kind != "transfusion":
            problems.append(f"logging.sample_every = {lg.sample_every} needs model.kind = transfusion (sample grids "
                            f"are images), got {cfg.model.kind}; set logging.sample_every = 0")
        elif ok("parallel.tp", "parallel.pp", "parallel.ep") and (world_size > 1 or max(p.tp, p.pp, p.ep) > 1):
            problems.append(f"logging.sample_every = {lg.sample_every} needs world size 1 (no tp/pp/ep, no data "
                            f"parallelism; {why}), got world size {world_size} with tp = {p.tp}, pp = {p.pp}, "
                            f"ep = {p.ep}; set logging.sample_every = 0 and sample with `megafusion generate`")
        elif not lg.sample_prompts:
            problems.append("logging.sample_every > 0 needs logging.sample_prompts: at least one prompt")
    elif ok("logging.sample_every"):
        defaults = LoggingConfig()
        for key in ("sample_prompts", "sample_steps"):
            if getattr(lg, key) != getattr(defaults, key) and ok(f"logging.{key}"):
                problems.append(f"logging.{key} = {getattr(lg, key)} has no effect with logging.sample_every = 0 "
                                "(no sample grids); set logging.sample_every or remove it")
    wandb = lg.wandb
    if wandb.project is None:
        for key, default in (("entity", None), ("mode", WandbConfig().mode)):
            if getattr(wandb, key) != default:
                problems.append(f"logging.wandb.{key} = {getattr(wandb, key)} has no effect without "
                                f"logging.wandb.project; set the project or remove the {key}")
    if wandb.project is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            problems.append(f"logging.wandb.project = {wandb.project} needs the wandb package, which is not "
                            "installed: pip install wandb, or unset logging.wandb.project")
    return problems


def _non_finite_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, message) of every NaN or infinite float in the config. Checked for all fields at once
    because a range check alone lets NaN through (``nan > 0`` and ``nan <= 0`` are both
    False): ``optimizer.clip_grad = nan`` used to train without clipping and exit 0, and
    ``optimizer.lr = nan`` got as far as torch's Adam and a 40-line traceback."""
    defaults = Config()

    def walk(node: Any, key: str) -> list[tuple[str, str]]:
        if dataclasses.is_dataclass(node):
            return [p for f in dataclasses.fields(node) for p in walk(getattr(node, f.name),
                                                                      f"{key}.{f.name}" if key else f.name)]
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in walk(v, f"{key}.{k}")]
        if isinstance(node, (list, tuple)):
            return [p for i, v in enumerate(node) for p in walk(v, f"{key}[{i}]")]
        if isinstance(node, float) and not math.isfinite(node):
            try:
                hint = f" (the default is {_get(defaults, key)})"
            except AttributeError:  # an item of a list or mapping: no default of its own
                hint = ""
            return [(key, f"{key} = {node} is not a finite number; set a finite value{hint}")]
        return []

    return walk(cfg, "")


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v >= low), f">= {low}"


def _above(low: float) -> tuple[Any, str]:
    return (lambda v: v > low), f"> {low}"


# Bounds of numeric keys that no other check covers: key -> (test, requirement, what the
# key means). A None value (where the field allows it) always passes.
_BOUNDS: dict[str, tuple[Any, str, str]] = {
    "model.num_kv_heads": (*_at_least(1), "null: one per query head"),
    "model.ffn_hidden_size": (*_at_least(1), "null: 4 * hidden_size"),
    "model.rope_base": (*_above(1), "the RoPE frequency base, e.g. 10000"),
    "model.init_std": (*_above(0), "the std of the initial weights"),
    "model.patch_position_init_std": (*_above(0), "the std of the learned patch positions"),
    "model.moe.num_experts": (*_at_least(0), "0: a dense FFN"),
    "model.moe.ffn_hidden_size": (*_at_least(1), "null: model.ffn_hidden_size"),
    "model.moe.shared_expert_ffn_hidden_size": (*_at_least(1), "null: no shared expert"),
    "model.moe.aux_loss_coeff": (*_at_least(0), "0: no load-balancing loss"),
    "model.moe.z_loss_coeff": (*_at_least(0), "null: no router z-loss"),
    "model.moe.capacity_factor": (*_above(0), "null: dropless"),
    "vision.image_size": (*_at_least(1), "pixels per side"),
    "vision.patch_size": (*_at_least(1), "pixels per patch side"),
    "diffusion.loss_weight": (*_at_least(0), "a negative weight would maximise the image loss"),
    # 0 is allowed: a run whose weights stay put (tests/training/test_fp8.py compares losses so)
    "optimizer.lr": (*_at_least(0), "the peak learning rate"),
    "optimizer.min_lr": (*_at_least(0), "the learning rate the schedule decays to"),
    "optimizer.weight_decay": (*_at_least(0), "0: no decay"),
    "optimizer.beta1": ((lambda v: 0 <= v < 1), "in [0, 1)", "Adam's first-moment decay"),
    "optimizer.beta2": ((lambda v: 0 <= v < 1), "in [0, 1)", "Adam's second-moment decay"),
    "optimizer.eps": (*_above(0), "Adam's denominator term"),
    "optimizer.clip_grad": (*_at_least(0), "0 disables clipping"),
    "schedule.warmup_steps": (*_at_least(0), "0: no warmup"),
    "schedule.decay_steps": (*_at_least(1), "null: train.steps"),
    "schedule.wsd_decay_fraction": ((lambda v: 0 < v <= 1), "in (0, 1]", "the decaying fraction of a WSD run"),
    "train.max_skipped_steps": (*_at_least(0), "null: 0 in fp32/bf16, unlimited in fp16"),
    "checkpoint.every": (*_at_least(0), "0: save only at the end"),
    "logging.every": (*_at_least(1), "log every N steps"),
    "logging.console_every": (*_at_least(1), "null: a console line for every logged step"),
    "logging.sample_every": (*_at_least(0), "0: no sample grids"),
    "logging.sample_steps": (*_at_least(1), "ODE steps per sampled image"),
}


def _bound_problems(cfg: Config) -> list[tuple[str, str]]:
    problems = []
    for key, (ok, requirement, meaning) in _BOUNDS.items():
        value = _get(cfg, key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue  # None: the documented default; NaN / inf: reported by _non_finite_problems
        if not ok(value):
            problems.append((key, f"{key} = {value} must be {requirement} ({meaning})"))
    return problems


def _data_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """What each data kind needs, checked before any process starts (the streams check again)."""
    d = cfg.data
    problems = []
    if d.weights and ok("data.weights") and (any(w < 0 for w in d.weights) or not sum(d.weights) > 0):
        problems.append(f"data.weights = {d.weights} must be non-negative with a positive sum")
    shapes = d.shapes_weights
    if ok("data.shapes_weights") and (any(w < 0 for w in shapes.values()) or not sum(shapes.values()) > 0):
        problems.append(f"data.shapes_weights = {shapes} must be non-negative with a positive sum "
                        "(a negative weight would count as 0)")
    if not ok("data.kind", "model.kind"):
        return problems  # what the kinds need is only known for kinds that exist
    if d.kind == "indexed" and not d.paths:
        problems.append("data.kind = indexed needs data.paths: the output prefixes of tools/preprocess_data.py")
    if d.kind == "indexed" and d.tokenizer is None:
        problems.append("data.kind = indexed needs data.tokenizer: the tokenizer the data was preprocessed with "
                        "(a sentencepiece .model, or a Hugging Face directory with data.tokenizer_type)")
    if d.kind == "energon":
        problems += _energon_problems(cfg)
    if d.kind == "shapes" and ok("vision.image_size") and cfg.vision.image_size not in (32, 64):
        problems.append(f"vision.image_size = {cfg.vision.image_size}: ShapesWorld (data.kind = shapes) renders 32 "
                        "or 64 pixel images; use one of those, or your own images through data.kind = indexed")
    if d.tokenizer is None and d.tokenizer_type != DataConfig().tokenizer_type:
        problems.append(f"data.tokenizer_type = {d.tokenizer_type} has no effect without data.tokenizer (the byte "
                        "tokenizer is used); set data.tokenizer to that tokenizer's path or remove the type")
    # Keys that only some data kinds read.
    for key, kinds in (("paths", ("indexed", "energon")), ("weights", ("indexed", "energon")),
                       ("tokenizer", ("indexed", "shapes", "energon"))):
        if getattr(d, key) != getattr(DataConfig(), key) and d.kind not in kinds:
            problems.append(f"data.{key} = {getattr(d, key)} has no effect with data.kind = {d.kind} (read only "
                            f"with data.kind = {' or '.join(kinds)}); remove it")
    return problems + _shapes_key_problems(cfg, ok)


# Read only by ShapesWorld generated in-process (data.kind = shapes: ShapesStream.from_config).
# Preprocessed ShapesWorld data (indexed: what the quickstart or `python -m megafusion.data.shapes`
# wrote) got its sources, vocabulary and held-out compositions when it was written, and
# `megafusion eval` reads them from that data (dataset names, --world DATA/manifest.json). (eval's
# trained_sources falls back to data.shapes_weights for any kind but indexed: for energon, now
# always the default, text and image_text.)
SHAPES_ONLY_KEYS = ("data.shapes_weights", "data.shapes_world", "data.shapes_holdout")


def _shapes_key_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """ShapesWorld settings with a data kind that never generates ShapesWorld: compared with
    the defaults, so only what was set counts. Each is named once: the text model refuses them
    as Transfusion settings (:func:`_ignored_setting_problems`), and a data kind the Transfusion
    model cannot read is refused by itself (its fix, data.kind = shapes, makes them count)."""
    if cfg.model.kind != "transfusion" or cfg.data.kind == "shapes" or cfg.data.kind not in MODEL_DATA_KINDS[
            "transfusion"]:
        return []
    defaults = Config()
    return [f"{key} = {_get(cfg, key)} has no effect with data.kind = {cfg.data.kind} (a ShapesWorld setting, read "
            f"only when data.kind = shapes generates ShapesWorld in-process; {cfg.data.kind} data is what its files "
            f"hold, as they were written); remove it or set data.kind = shapes"
            for key in SHAPES_ONLY_KEYS if _get(cfg, key) != _get(defaults, key) and ok(key)]


def _energon_problems(cfg: Config) -> list[str]:
    """data.kind = energon: Energon-prepared datasets of a sample type the stream reads
    (``megafusion.data.energon_paths``: dataset.yaml only; energon is not imported), indexed
    prefixes to blend in, one weight per path, and the energon package itself."""
    import importlib.util

    from megafusion.data.energon_paths import energon_path_problems

    d = cfg.data
    if not d.paths:
        return ["data.kind = energon needs data.paths: Energon-prepared WebDataset datasets (energon prepare), "
                "optionally with indexed prefixes to blend in by data.weights"]
    problems = energon_path_problems(list(d.paths))
    if d.weights and len(d.weights) != len(d.paths):
        problems.append(f"data.weights = {d.weights}: give one weight per data.paths entry ({len(d.paths)})")
    if importlib.util.find_spec("megatron.energon") is None:
        problems.append("data.kind = energon needs megatron-energon: pip install 'megafusion[energon]'")
    return problems


# The data kinds each model kind's provider reads (megafusion.recipes).
MODEL_DATA_KINDS = {"text": ("synthetic", "indexed"), "transfusion": ("shapes", "indexed", "energon")}


def _data_kind_problem(model_kind: str, data_kind: str) -> str | None:
    if data_kind in MODEL_DATA_KINDS[model_kind]:
        return None
    if model_kind == "transfusion" and data_kind == "synthetic":
        return ("data.kind = synthetic is text only and the Transfusion model needs images: set data.kind "
                "= shapes (ShapesWorld, generated in-process) or indexed (tools/preprocess_data.py)")
    if model_kind == "text" and data_kind == "shapes":
        return ("data.kind = shapes is multimodal and model.kind = text reads text only: set data.kind = "
                "synthetic or indexed, or model.kind = transfusion")
    if model_kind == "text" and data_kind == "energon":
        return ("data.kind = energon reads image-caption datasets and model.kind = text reads text only: set "
                "data.kind = synthetic or indexed, or model.kind = transfusion")
    if model_kind == "text":  # a kind outside the choices (validate names those first)
        return (f"data.kind = {data_kind!r}: model.kind = text reads synthetic text or preprocessed text "
                "datasets (indexed)")
    return (f"data.kind = {data_kind!r}: the Transfusion provider reads ShapesWorld in-process (shapes) or "
            "preprocessed datasets (indexed)")


def provider_problems(cfg: Config, ok: Callable[..., bool] = lambda *keys: True) -> list[str]:
    """What the model kind's provider needs of the data and of the files the config names:
    a data kind it reads, a tokenizer and datasets that fit model.vocab_size, datasets and a
    representation that exist, square patch grids where a setting needs them
    (``megafusion.config_checks``: metadata reads only, no process group). validate reports
    these with every other problem; ``require_provider_config`` refuses with them alone."""
    if not ok("data.kind", "model.kind") or cfg.model.kind not in MODEL_DATA_KINDS:
        return []  # what the kinds need is only known for kinds that exist
    problem = _data_kind_problem(cfg.model.kind, cfg.data.kind)
    if problem is not None:
        return [problem]
    return config_checks.file_problems(cfg, ok)


def require_provider_config(cfg: Config) -> None:
    """ConfigError with every :func:`provider_problems` of ``cfg``. A config that passed
    validate has none; a recipe calls this for one that did not (a test's, a library
    user's), so a provider is never built on data it cannot read."""
    problems = provider_problems(cfg)
    if problems:
        raise problems_error(problems)


# model.kind = text builds megatron's GPTModel (megafusion/model/text.py): one FFN, the
# attention of model.spec's layer, no images. These Transfusion settings reach nothing there.
_TRANSFUSION_ONLY_KEYS = (
    "model.attention", "model.ffn", "model.patch_adapter", "model.time_conditioning", "model.image_positions",
    "model.patch_positions", "model.patch_position_init_std", "model.rope_layout", "model.frame_positions",
    "model.frame_conditioning", "model.action_conditioning", "model.moe.per_modality_shared_experts",
    "data.shapes_weights", "data.shapes_world", "data.shapes_holdout",
)
_TRANSFUSION_ONLY_SECTIONS = ("vision", "diffusion")


def transfusion_only(key: str) -> bool:
    """Whether a dotted key is read by the Transfusion model only (model.kind = text refuses it)."""
    return key in _TRANSFUSION_ONLY_KEYS or key.split(".")[0] in _TRANSFUSION_ONLY_SECTIONS


def _ignored_setting_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """Settings the chosen model kind never reads: a run that silently ignores one is not
    the run that was asked for. Compared with the defaults, so only what was set counts."""
    if cfg.model.kind != "text":
        return []
    defaults = Config()
    keys = list(_TRANSFUSION_ONLY_KEYS)
    for section in _TRANSFUSION_ONLY_SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(defaults, section))]
    return [f"{key} = {_get(cfg, key)} has no effect with model.kind = text (a Transfusion setting: the text model "
            f"is megatron's GPT with one FFN, model.spec's attention and no images); remove it or set "
            f"model.kind = transfusion"
            for key in keys if _get(cfg, key) != _get(defaults, key) and ok(key)]


def _transformer_engine_installed() -> bool:
    """Whether Transformer Engine can be found, without importing it (CPU code paths never do)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _cuda_capability(cfg: Config) -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of this process's GPU, or None when the run is not on CUDA."""
    import os

    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def _transformer_engine_problems(cfg: Config, ok: Callable[..., bool]) -> list[str]:
    """model.spec = te and train.fp8 need Transformer Engine, a CUDA GPU and bf16."""
    m, t = cfg.model, cfg.train
    problems: list[str] = []
    if not ok("train.fp8", "model.spec", "train.device"):
        return problems  # what an unknown recipe, spec or device needs is unknown
    fp8 = t.fp8 != "none"
    if t.fp8_params and not fp8:
        problems.append("train.fp8_params = true needs an FP8 recipe: set train.fp8 = delayed | tensorwise | mxfp8")
    if t.fp8_params and not cfg.parallel.distributed_optimizer:
        # Megatron-LM refuses it too: only the distributed optimizer copies its updated main
        # params into the FP8 weights (fp8_param_gather); otherwise they never change.
        problems.append("train.fp8_params = true needs parallel.distributed_optimizer = true (only the "
                        "distributed optimizer updates FP8 weights): set it, or train.fp8_params = false")
    if fp8 and m.spec != "te":
        problems.append(f"train.fp8 = {t.fp8} needs model.spec = te (FP8 matmuls run in Transformer Engine "
                        f"layers), got model.spec = {m.spec}")
    if fp8 and ok("train.precision") and t.precision != "bf16":
        problems.append(f"train.fp8 = {t.fp8} needs train.precision = bf16 (the layers outside the FP8 matmuls "
                        f"run in bf16), got {t.precision}")
    if m.spec != "te" and not fp8:
        return problems
    what = f"train.fp8 = {t.fp8}" if fp8 else "model.spec = te"
    gpu = _cuda_capability(cfg)
    if gpu is None:
        problems.append(f"{what} needs a CUDA GPU (Transformer Engine has no CPU kernels) and train.device = "
                        f"{t.device} finds none; on CPU use model.spec = local and train.fp8 = none")
    if not _transformer_engine_installed():
        problems.append(f"{what} needs Transformer Engine, which is not installed: pip install "
                        "'megafusion[gpu]' (transformer-engine[pytorch]) on the CUDA machine, or use "
                        "model.spec = local and train.fp8 = none")
    if t.fp8 == "mxfp8" and gpu is not None and gpu[1][0] < 10:
        name, (major, minor) = gpu
        problems.append(f"train.fp8 = mxfp8 needs a Blackwell-class GPU (compute capability >= 10.0); "
                        f"'{name}' has {major}.{minor}: use train.fp8 = delayed or tensorwise")
    return problems

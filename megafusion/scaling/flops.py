"""Training FLOPs, parameter counts and MFU for a Transfusion model, from plain numbers.

What is counted (matrix products only, 2 FLOPs per multiply-add; norms, softmax, RoPE,
activations and the embedding lookup are a rounding error and are left out, as in
Megatron-LM's and PaLM's accounting):

- per layer and position: the Q/K/V and output projections, then the dense FFN (gated:
  three h x f products, plain: two) or the MoE (router + ``moe_top_k`` routed experts +
  the shared expert, i.e. *active* parameters only);
- per layer and unmasked query-key pair of the hybrid mask: scores ``q.k`` and the
  weighted sum of values, 2 * 2 * hidden_size FLOPs. Pairs are those the packing really
  has (``i`` sees ``j`` iff same document and (``j <= i`` or same image span)), counted
  per document without building the N x N mask;
- the LM head on text positions; on latent positions the patch-in / patch-out adapters
  (linear, or the U-Net's convolutions per image: ``megafusion.model.unet``) and the time
  conditioning (``additive``: the timestep-embedding MLP; ``adaln``: the modulation
  ``Linear(freq_dim -> 2 hidden)`` of both pre-norms of every layer);
- backward = 2 x forward, so a training step is 3 x forward. This assumes gradients
  w.r.t. every input, also those fed by data (the usual 6ND convention); a real step
  skips the input-gradients of patch-in and of the timestep features.

These are *model* FLOPs, the work the result needs (what MFU divides by the peak): the
model also runs its linear adapters, time embedding and LM head on positions of the other
modality and throws the result away, and a dense attention kernel may compute masked
pairs; none of that is counted. Every position of the packing is counted, padding too:
it costs the same work. Pass the packing without its padding to count only useful FLOPs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

TEXT = 0  # megafusion.data.sample.TEXT; every other modality value is a latent position


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide the FLOPs and parameters of a (Transfusion) transformer.

    Optional sizes follow the config defaults: ``ffn_hidden_size`` None = 4 * hidden,
    ``num_kv_heads`` None = ``num_heads``, ``moe_ffn_hidden_size`` None =
    ``ffn_hidden_size``. ``latent_dim`` 0 means a text-only model (no patch adapters).
    ``ffn_copies`` / ``shared_expert_copies`` count modality-specific copies (one per
    modality, each position uses one): they add parameters, not FLOPs.
    ``time_conditioning`` (none | additive | adaln) applies to latent positions only.
    U-Net adapters (``patch_adapter = "unet"``) need the latent layout: ``latent_channels``
    x ``latent_patch_size``^2 = ``latent_dim`` values per token, ``tokens_per_image``
    tokens (a square grid) per image, ``unet_channels`` conv channels.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    ffn_hidden_size: int | None = None
    num_kv_heads: int | None = None
    latent_dim: int = 0
    gated_ffn: bool = True  # swiglu: gate and up projections
    num_experts: int = 0  # 0 = dense FFN
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None
    shared_expert_ffn_hidden_size: int | None = None  # None/0 = no shared expert
    patch_adapter: str = "linear"
    tie_embeddings: bool = True
    ffn_copies: int = 1
    shared_expert_copies: int = 1
    time_conditioning: str = "none"  # none | additive | adaln
    time_frequency_dim: int = 256  # sinusoidal features of t (megafusion.model.embeddings)
    latent_channels: int = 0  # U-Net only
    latent_patch_size: int = 1
    tokens_per_image: int = 0
    unet_channels: int = 32

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} = {getattr(self, name)} must be at least 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelShape.hidden_size = {self.hidden_size} is not divisible by "
                             f"num_heads = {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"ModelShape.num_heads = {self.num_heads} is not a multiple of "
                             f"num_kv_heads = {self.kv_heads}")
        if self.num_experts and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"ModelShape.moe_top_k = {self.moe_top_k} must be between 1 and "
                             f"num_experts = {self.num_experts}")
        if self.patch_adapter not in ("linear", "unet"):
            raise ValueError(f"ModelShape.patch_adapter = {self.patch_adapter!r}: only 'linear' and 'unet' patch "
                             "adapters are counted; add the adapter's FLOPs to megafusion/scaling/flops.py first")
        if self.time_conditioning not in ("none", "additive", "adaln"):
            raise ValueError(f"ModelShape.time_conditioning = {self.time_conditioning!r} is not one of none, "
                             "additive, adaln")
        if self.patch_adapter == "unet":
            p, grid = self.latent_patch_size, math.isqrt(self.tokens_per_image)
            if (self.latent_channels < 1 or p < 1 or p & (p - 1) or grid < 1 or grid * grid != self.tokens_per_image
                    or self.latent_channels * p * p != self.latent_dim):
                raise ValueError(
                    f"ModelShape with patch_adapter = 'unet' needs latent_channels * latent_patch_size^2 = latent_dim "
                    f"(a power-of-two patch size) and a square tokens_per_image; got latent_channels = "
                    f"{self.latent_channels}, latent_patch_size = {p}, latent_dim = {self.latent_dim}, "
                    f"tokens_per_image = {self.tokens_per_image} (from_model_config: pass "
                    "unet_layout = (channels, patch size, tokens per image), the provider's unet_layout)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn

    @property
    def shared_ffn(self) -> int:
        return self.shared_expert_ffn_hidden_size or 0

    @classmethod
    def from_model_config(cls, model: Mapping[str, Any]) -> "ModelShape":
        """Reads the ``model:`` section of a trainer config as a plain dict (YAML keys).

        Unset keys take the trainer's defaults (megafusion.config.ModelConfig). Two keys
        that are not in the YAML come from the vision representation: ``latent_dim`` (0 or
        absent: a text-only model, which has no time conditioning either) and, for
        ``patch_adapter: unet``, ``unet_layout`` = (channels, patch size, tokens per image).
        """
        moe = model.get("moe") or {}
        latent_dim = int(model.get("latent_dim") or 0)
        kw: dict[str, Any] = dict(
            hidden_size=int(model.get("hidden_size", 64)),
            num_layers=int(model.get("num_layers", 2)),
            num_heads=int(model.get("num_heads", 4)),
            vocab_size=int(model.get("vocab_size", 256)),
            ffn_hidden_size=model.get("ffn_hidden_size"),
            num_kv_heads=model.get("num_kv_heads"),
            latent_dim=latent_dim,
            gated_ffn=model.get("activation", "swiglu") == "swiglu",
            num_experts=int(moe.get("num_experts") or 0),
            moe_top_k=int(moe.get("top_k", 2)),
            moe_ffn_hidden_size=moe.get("ffn_hidden_size"),
            shared_expert_ffn_hidden_size=moe.get("shared_expert_ffn_hidden_size"),
            tie_embeddings=bool(model.get("tie_embeddings", True)),
        )
        if latent_dim:
            kw["time_conditioning"] = model.get("time_conditioning", "additive")
            kw["patch_adapter"] = model.get("patch_adapter", "linear")
            if kw["patch_adapter"] == "unet":
                layout = model.get("unet_layout")
                if not layout or len(layout) != 3:
                    raise ValueError("model.patch_adapter = unet: pass unet_layout = (channels, patch size, tokens per "
                                     "image) of the representation (TransfusionProvider.unet_layout) to count the "
                                     "U-Net's convolutions")
                kw.update(latent_channels=int(layout[0]), latent_patch_size=int(layout[1]),
                          tokens_per_image=int(layout[2]))
        return cls(**kw)


# --------------------------------------------------------------------------- attention pairs


def _as_2d(x: Any) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def attention_pairs(doc_ids: Any, span_ids: Any) -> int:
    """Number of (query, key) pairs the hybrid mask lets through, summed over the batch.

    ``doc_ids`` and ``span_ids`` are [N] or [B, N] integer arrays (torch or numpy).
    Per document of length L: L (L + 1) / 2 causal pairs, plus for each image span of c
    positions inside it c (c - 1) / 2 pairs that look forward. O(N log N), no N x N mask.
    """
    docs, spans = _as_2d(doc_ids).astype(np.int64), _as_2d(span_ids).astype(np.int64)
    if docs.shape != spans.shape:
        raise ValueError(f"doc_ids {docs.shape} and span_ids {spans.shape} must have the same shape")
    rows = np.broadcast_to(np.arange(docs.shape[0])[:, None], docs.shape)
    _, doc_len = np.unique(np.stack([rows.ravel(), docs.ravel()]), axis=1, return_counts=True)
    in_span = spans.ravel() >= 0
    keys = np.stack([rows.ravel()[in_span], docs.ravel()[in_span], spans.ravel()[in_span]])
    span_len = np.unique(keys, axis=1, return_counts=True)[1] if keys.shape[1] else np.zeros(0, np.int64)
    return int((doc_len * (doc_len + 1) // 2).sum() + (span_len * (span_len - 1) // 2).sum())


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class PackingCounts:
    """What the FLOPs of a packed batch depend on: position counts and unmasked pairs.

    Integers for one batch (:func:`packing_counts`); means per sequence (floats) for a
    measured packing (:func:`mean_packing_counts`).
    """

    positions: float
    latent: float  # positions whose modality is not TEXT (image patches, video frames)
    pairs: float  # (query, key) pairs of the hybrid mask, see attention_pairs

    @property
    def text(self) -> float:
        return self.positions - self.latent


def packing_counts(doc_ids: Any, span_ids: Any, modality: Any) -> PackingCounts:
    """Counts of a packed batch ([N] or [B, N] arrays, see Sample)."""
    mod = _as_2d(modality)
    return PackingCounts(positions=int(mod.size), latent=int((mod != TEXT).sum()),
                         pairs=attention_pairs(doc_ids, span_ids))


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one step by part; ``training`` = 3 x ``forward`` (fwd + bwd)."""

    attention_projections: int  # Q, K, V and output projections
    attention_scores: int  # q.k and attention-weighted values on the unmasked pairs
    ffn: int  # dense FFN, or routed + shared experts
    router: int
    lm_head: int  # text positions
    patch_adapters: int  # patch-in and patch-out, latent positions
    time_conditioning: int  # timestep embedding MLP / AdaLN modulations, latent positions

    @property
    def forward(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def training(self) -> int:
        return 3 * self.forward


def _ffn_flops_per_position(width: int, hidden: int, gated: bool) -> int:
    return 2 * hidden * width * (3 if gated else 2)


def _time_mlp(frequency_dim: int, width: int) -> tuple[int, int]:
    """(forward FLOPs, parameters) of ``TimestepEmbedding(width, frequency_dim)``: one call."""
    return 2 * (frequency_dim * width + width * width), frequency_dim * width + width * width + 2 * width


@dataclass(frozen=True)
class UNetCost:
    """Forward FLOPs per image and parameters of the U-Net adapters (megafusion.model.unet)."""

    down_flops: int
    up_flops: int
    down_params: int
    up_params: int


def unet_cost(shape: ModelShape) -> UNetCost:
    """Every convolution (2 x c_in x c_out x k^2 per output pixel, as torch's FLOP counter
    counts it: padding included) and linear of ``UNetDown`` + ``UNetUp`` on one image of
    ``tokens_per_image`` = g^2 tokens, i.e. a (g p) x (g p) map of ``latent_channels``.
    GroupNorm, SiLU, nearest upsampling and bias adds are not matrix products: not counted."""
    c, p, h, b = shape.latent_channels, shape.latent_patch_size, shape.hidden_size, shape.unet_channels
    g, levels = math.isqrt(shape.tokens_per_image), int(math.log2(p))
    size = g * p  # the latent map's side

    def conv(c_in: int, c_out: int, kernel: int, side: int) -> int:  # side: output resolution
        return 2 * c_in * c_out * kernel * kernel * side * side

    time_flops, time_params = _time_mlp(shape.time_frequency_dim, b)
    block_flops = [2 * conv(b, b, 3, side) + 2 * b * b for side in (size >> k for k in range(levels + 1))]
    block_params = 2 * (9 * b * b + b) + (b * b + b) + 2 * 2 * b  # two convs, time linear, two GroupNorms
    down = (time_flops + conv(c, b, 3, size) + sum(block_flops)
            + sum(conv(b, b, 3, size >> (k + 1)) for k in range(levels)) + conv(b, h, 1, g))
    up = (time_flops + conv(h, b, 1, g) + sum(block_flops)
          + sum(conv(b, b, 3, g << (k + 1)) for k in range(levels)) + conv(b, c, 3, size))
    down_params = (time_params + 9 * c * b + b + (levels + 1) * block_params + levels * (9 * b * b + b)
                   + b * h + h)
    up_params = (time_params + h * b + b + levels * (9 * b * b + b) + (levels + 1) * block_params + 2 * b
                 + 9 * b * c + c)
    return UNetCost(down, up, down_params, up_params)


def _adapter_flops_per_latent(shape: ModelShape) -> float:
    if shape.patch_adapter == "unet":
        cost = unet_cost(shape)
        return (cost.down_flops + cost.up_flops) / shape.tokens_per_image  # whole images only
    return 2 * 2 * shape.hidden_size * shape.latent_dim


def _time_flops_per_latent(shape: ModelShape) -> int:
    if shape.time_conditioning == "additive":
        return _time_mlp(shape.time_frequency_dim, shape.hidden_size)[0]
    if shape.time_conditioning == "adaln":  # both pre-norms of every layer: F -> 2 h
        return shape.num_layers * 2 * 2 * shape.time_frequency_dim * 2 * shape.hidden_size
    return 0


def flop_breakdown_of_counts(shape: ModelShape, counts: PackingCounts) -> FlopBreakdown:
    """Forward FLOPs of one step over a batch with these counts (floats are rounded)."""
    if counts.latent and not shape.latent_dim:
        raise ValueError(f"the packing has {counts.latent:g} latent positions but ModelShape.latent_dim = 0 "
                         "(a text-only model); set latent_dim to the patch width")
    h, layers, positions = shape.hidden_size, shape.num_layers, counts.positions
    qkv_out = 2 * h * (h + 2 * shape.kv_heads * shape.head_dim) + 2 * h * h
    if shape.num_experts:
        ffn = shape.moe_top_k * _ffn_flops_per_position(shape.expert_ffn, h, shape.gated_ffn)
        ffn += _ffn_flops_per_position(shape.shared_ffn, h, shape.gated_ffn)
        router = 2 * h * shape.num_experts
    else:
        ffn, router = _ffn_flops_per_position(shape.ffn, h, shape.gated_ffn), 0
    return FlopBreakdown(
        attention_projections=round(layers * positions * qkv_out),
        attention_scores=round(layers * counts.pairs * 4 * h),
        ffn=round(layers * positions * ffn),
        router=round(layers * positions * router),
        lm_head=round(counts.text * 2 * h * shape.vocab_size),
        patch_adapters=round(counts.latent * _adapter_flops_per_latent(shape)) if counts.latent else 0,
        time_conditioning=round(counts.latent * _time_flops_per_latent(shape)),
    )


def flop_breakdown(shape: ModelShape, doc_ids: Any, span_ids: Any, modality: Any) -> FlopBreakdown:
    """Forward FLOPs of one step over a packed batch ([N] or [B, N] arrays, see Sample)."""
    return flop_breakdown_of_counts(shape, packing_counts(doc_ids, span_ids, modality))


def training_flops_per_step(shape: ModelShape, doc_ids: Any, span_ids: Any, modality: Any) -> int:
    """FLOPs of forward + backward over one packed batch ([N] or [B, N]); see module doc."""
    return flop_breakdown(shape, doc_ids, span_ids, modality).training


def nominal_packing(seq_length: int, doc_length: int | None = None, span_length: int = 0,
                    spans_per_doc: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A regular packing for planning: ``(doc_ids, span_ids, modality)``, each [seq_length].

    Documents of ``doc_length`` positions (None = the whole sequence; the last one may be
    shorter), each ending with ``spans_per_doc`` image spans of ``span_length`` latent
    positions, each preceded by one text (marker) position.
    """
    doc_length = doc_length or seq_length
    if spans_per_doc * (span_length + 1) > doc_length:
        raise ValueError(f"{spans_per_doc} spans of {span_length} latent positions (+1 marker each) do not fit "
                         f"in a document of {doc_length} positions")
    pos = np.arange(seq_length)
    doc_ids, offset = pos // doc_length, pos % doc_length
    span_ids = np.full(seq_length, -1, np.int64)
    modality = np.full(seq_length, TEXT, np.int64)
    start = doc_length - spans_per_doc * (span_length + 1)
    for k in range(spans_per_doc):
        first = start + k * (span_length + 1) + 1  # after the marker
        inside = (offset >= first) & (offset < first + span_length)
        span_ids[inside] = doc_ids[inside] * spans_per_doc + k
        modality[inside] = 1
    return doc_ids, span_ids, modality


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. ``active`` counts top-k routed experts instead of all of them and
    one modality copy; ``active_non_embedding`` further drops the embedding table and LM
    head (Kaplan et al.'s N, the one the IsoFLOP fitter uses)."""

    total: int
    active: int
    embedding: int  # input table + untied LM head

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def params(shape: ModelShape) -> ParamCount:
    """Parameters of the model: bias-free transformer linears, one RMSNorm weight per norm;
    the patch adapters and timestep embeddings with their biases, as megafusion builds them."""
    h = shape.hidden_size
    proj = 2 if not shape.gated_ffn else 3
    attn = h * (h + 2 * shape.kv_heads * shape.head_dim) + h * h + 2 * h  # + two norms
    if shape.num_experts:
        expert = proj * h * shape.expert_ffn
        shared = proj * h * shape.shared_ffn
        router = h * shape.num_experts
        ffn_total = shape.num_experts * expert + shape.shared_expert_copies * shared + router
        ffn_active = shape.moe_top_k * expert + shared + router
    else:
        ffn_total = shape.ffn_copies * proj * h * shape.ffn
        ffn_active = proj * h * shape.ffn
    if shape.time_conditioning == "adaln":  # a modulation Linear(F -> 2 h, no bias) per pre-norm
        attn += 2 * shape.time_frequency_dim * 2 * h
    embedding = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
    adapters = 0
    if shape.latent_dim:
        if shape.patch_adapter == "unet":
            cost = unet_cost(shape)
            adapters = cost.down_params + cost.up_params
        else:
            adapters = 2 * h * shape.latent_dim + h + shape.latent_dim
        if shape.time_conditioning == "additive":
            adapters += _time_mlp(shape.time_frequency_dim, h)[1]
    rest = embedding + adapters + h  # + final norm
    return ParamCount(total=shape.num_layers * (attn + ffn_total) + rest,
                      active=shape.num_layers * (attn + ffn_active) + rest, embedding=embedding)


# --------------------------------------------------------------------------- MFU

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU. Sources: NVIDIA datasheets - "NVIDIA H100
# Tensor Core GPU" datasheet (SXM / PCIe / NVL columns; the starred figures there are
# with sparsity, halved here), "NVIDIA H200 Tensor Core GPU" datasheet (SXM = H100 SXM's
# rates), "NVIDIA GH200 Grace Hopper Superchip" datasheet, "NVIDIA A100 Tensor Core GPU"
# datasheet (same rates for SXM and PCIe, 40 and 80 GB). fp32 is the plain (non-tensor
# core) rate: PyTorch does not use TF32 for matmuls unless asked to.
_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "GH200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    # Blackwell, dense (NVIDIA lists tensor-core figures with 2:4 sparsity; dense is half):
    # nvidia.com/en-us/data-center/gb200-nvl72 ("Individual Blackwell GPU Specifications":
    # HGX B200 at 1000 W: FP16/BF16 4.5 PFLOPS, FP8 9, TF32 2.2 sparse, FP32 75 TFLOPS;
    # GB200 at 1200 W: 5, 10, 2.5 sparse, FP32 80 TFLOPS) and the HGX B200 datasheet.
    "B200": {"fp32": 75.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
    "GB200": {"fp32": 80.0, "tf32": 1250.0, "bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0},
}

_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "tf32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8", "e5m2": "fp8", "hybrid": "fp8",
}


def gpu_model(device_name: str) -> str | None:
    """Maps ``torch.cuda.get_device_name()`` (e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA H200',
    'NVIDIA A100-SXM4-80GB', 'NVIDIA B200', 'NVIDIA GB200') to a key of the peak table, or
    None when not known for sure."""
    name = device_name.upper().replace("-", " ")
    if "GB200" in name:  # before B200, which it contains
        return "GB200"
    if re.search(r"(?<![A-Z0-9])B200(?![0-9])", name):  # 'NVIDIA B200'
        return "B200"
    if "GH200" in name:
        return "GH200"
    if "H200" in name:
        return "H200 NVL" if "NVL" in name else "H200 SXM"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        if "NVL" in name:
            return "H100 NVL"
        if "HBM3" in name or "SXM" in name:
            return "H100 SXM"
        return None  # a bare 'H100' does not say which form factor (their peaks differ)
    if "A100" in name:
        return "A100"
    return None


def matmul_dtype(precision: str, fp8: str | None = "none") -> str:
    """The dtype the model's matmuls run in, for the MFU peak: FP8 when an FP8 recipe is on
    (``train.fp8`` delayed | tensorwise | mxfp8: Transformer Engine's GEMMs), else
    ``train.precision``. Dividing FP8 work by the bf16 peak would double the MFU."""
    return "fp8" if fp8 and fp8 != "none" else precision


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Documented dense peak FLOP/s of one GPU for ``dtype``; None if the GPU is unknown or
    lacks that dtype (A100 and fp8). Never another GPU's figure."""
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r} for MFU; use one of fp32, tf32, bf16, fp16, fp8")
    model = gpu_model(device_name)
    if model is None or key not in _PEAK_TFLOPS[model]:
        return None
    return _PEAK_TFLOPS[model][key] * 1e12


def mfu(flops_per_s: float, device_name: str, dtype: str) -> float | None:
    """Model FLOPs utilisation of one GPU (fraction of its dense peak), None if unknown.

    ``flops_per_s``: achieved model FLOPs per second *per GPU* (training_flops_per_step
    of the rank's share of the batch / step time).
    """
    peak = peak_flops(device_name, dtype)
    return None if peak is None else flops_per_s / peak


def format_mfu(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"

"""Activation memory of one training micro-batch: the bytes megafusion's layers keep for backward.

The per-layer formula follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models": ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in fp16 without
parallelism, ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` with TP, ``34/t`` with TP + SP), but every
term is one tensor *our* layer saves, as megafusion builds it (megatron-core's local
TransformerLayer with our core attention sdpa | flex | triton, RoPE, RMSNorm/LayerNorm or
AdaLN norms, dense / modality-specific FFN / megatron MoE with per-modality shared experts,
swiglu | gelu, GQA, no dropout and no biases). It was derived by counting, on CPU, the
storages autograd holds for backward (``torch.autograd.graph.saved_tensors_hooks``, each
storage once, parameters and the batch's own tensors excluded) and is checked against
that count in ``tests/scaling/test_activation_memory.py`` (docs/scaling.md, "Activation
memory").

Notation: s = model.seq_length, b = micro-batch, h = hidden, a = heads, g = key/value groups,
d = h / a (head dim), f = FFN width, t = TP, e = bytes of the training dtype (fp32 4, bf16 2),
s' = s / t under sequence parallelism (the residual stream's local length), else s.
Attention and FFN interiors always hold the whole sequence with a/t heads, f/t columns.

``device_type="cpu"`` predicts what a CPU run saves (what the test counts). ``"cuda"``
predicts the GPU kernels; these CUDA-only assumptions cannot be counted on the CPU machine:

- RMSNorm: ``F.rms_norm`` on CUDA is one fused kernel that saves its input and an fp32 rstd
  [s', b]; on CPU it decomposes and saves an fp32 copy of the input (a new tensor under bf16),
  ``x * rsqrt`` in fp32 and rsqrt.
- sdpa: with the dense boolean mask, CUDA runs the memory-efficient kernel, which saves q,
  k, v, the output, an fp32 logsumexp [b, a/t, s] and the additive mask it converts the
  boolean one to, [b, 1, s, s] in the training dtype (per layer: it is converted per call).
  With GQA our backend repeats k and v to a heads first (``repeat_interleave``), so the
  saved k and v are the repeated [s, b, a/t, d] tensors. The CPU flash kernel saves the same
  q, k, v, output and logsumexp and also the mask as [b, 1, s, s] in the training dtype.
- flex: compiled flex attention saves q, k, v, the output and one fp32 logsumexp; the eager
  CPU op saves one more fp32 [b, a/t, s] tensor.
- triton: the same code on both: contiguous copies of q, k, v, the [b, a/t, s, d] output, its
  [s, b, h/t] copy for the output projection, an fp32 logsumexp, int32 doc/span ids.
- FP8 (``train.fp8``) and Transformer Engine (``model.spec: te``) layers save other tensors;
  they are not modelled (the bf16 numbers are returned).
- Outputs of flash / efficient / flex kernels are laid out so that megatron's
  [s, b, h/t] view of them is not a copy (as on CPU).

Not modelled: expert load imbalance (MoE terms assume every rank receives its share,
``s*b*k`` routed tokens per micro-batch), the zero rows ``ModalityFFN`` pads each modality to
under sequence parallelism (equal split assumed), context parallelism, dropout masks
(megafusion trains without dropout), the pipeline's p2p buffers, and the optional adapters
of the first / last stage (U-Net patch adapters, learned patch positions, frame conditioning
and actions; linear adapters are modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

FREQUENCY_DIM = 256  # sinusoidal time features (TimestepEmbedding, AdaLN's TimeContext)
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one pipeline rank at its 1F1B peak."""

    per_layer: int  # bytes one transformer layer keeps for backward, one micro-batch, this rank
    layers: int  # layers on this pipeline rank (all its virtual chunks)
    in_flight: int  # micro-batches (model-chunk forwards under vpp) whose activations are held at the peak
    # embeddings / time embedding (first stage); final norm with its input, PatchOut input, CE (last stage).
    # Each layer's own input is in per_layer (its input norm saves it), so a stage's received input is too.
    outside_layers: int
    vpp: int = 1  # virtual chunks per pipeline rank (``in_flight`` then counts chunk forwards)

    @property
    def total(self) -> int:
        """Bytes at the peak: every in-flight (micro-batch, chunk) holds its chunk's layers; the
        outside terms are counted once per in-flight entry as well (an upper bound under vpp,
        where only the first / last chunk has them)."""
        return self.in_flight * (self.per_layer * (self.layers // self.vpp) + self.outside_layers)


def in_flight_microbatches(pp: int, pp_rank: int, num_microbatches: int | None, vpp: int | None = None) -> int:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak.

    Plain 1F1B: ``pp - pp_rank`` (the warm-up forwards plus the one of the first steady
    step), capped by the number of micro-batches. Interleaved 1F1B (megatron's schedule with
    ``vpp`` chunks per rank): the warm-up runs ``(pp - pp_rank - 1) * 2 + (vpp - 1) * pp``
    chunk forwards and the steady state one more, capped by ``num_microbatches * vpp``; the
    result then counts chunk forwards (each holds ``layers / vpp`` layers).
    """
    if vpp and vpp > 1:
        n = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1
        cap = None if num_microbatches is None else num_microbatches * vpp
    else:
        n = pp - pp_rank
        cap = num_microbatches
    return max(1, min(n, cap) if cap is not None else n)


def _norm_saved(cfg, tokens_local: int, e: int, device_type: str) -> int:
    """What one pre-norm saves besides its output: its input (the residual stream) and stats."""
    h = cfg.model.hidden_size
    if cfg.model.normalization == "layernorm":
        return tokens_local * h * e + 2 * tokens_local * 4  # input + fp32 mean, rstd
    if device_type == "cuda":
        return tokens_local * h * e + tokens_local * 4  # fused rms_norm: input + fp32 rstd
    # decomposed RMSNorm: fp32 input (a copy under bf16), fp32 x * rsqrt, fp32 rsqrt
    return tokens_local * h * 4 * 2 + tokens_local * 4


def _norm_keeps_input(cfg, e: int, device_type: str) -> bool:
    """Whether a pre-norm saves its input tensor itself (not an fp32 copy of it)."""
    return cfg.model.normalization == "layernorm" or device_type == "cuda" or e == 4


def _adaln_extra(cfg, tokens_local: int, e: int) -> int:
    """AdaLN's ``y * (1 + scale) + shift`` on *all* positions (``where`` picks latent ones after):
    y and (1 + scale) [s', b, h]; the fp32 time features cast to the dtype (a copy under bf16)."""
    if cfg.model.time_conditioning != "adaln":
        return 0
    h = cfg.model.hidden_size
    return 2 * tokens_local * h * e + (tokens_local * FREQUENCY_DIM * e if e != 4 else 0)


def _mlp(tokens: float, width: float, swiglu: bool, e: int) -> float:
    """megatron MLP on ``tokens`` rows of (TP-local) ``width`` columns: swiglu saves the fc1
    output (2 width: gate and up, one storage), a copy of up, silu(gate) and the product (fc2's
    input); gelu saves the fc1 output and gelu's output."""
    return tokens * width * e * (5 if swiglu else 2)


def _modality_ffn(tokens_local: float, tokens: float, h: int, width: float, swiglu: bool, e: int) -> float:
    """ModalityFFN: each modality's rows are copied out (index_select + pad, fc1's input) and
    their outputs sliced back (index_copy's source): 2 h per local token; both MLPs together
    run every token once (all TP ranks' rows under SP)."""
    return 2 * tokens_local * h * e + _mlp(tokens, width, swiglu, e)


def _per_layer(cfg, device_type: str) -> int:
    m, p, t_cfg = cfg.model, cfg.parallel, cfg.train
    e = _BYTES[t_cfg.precision]
    s, b, h = m.seq_length, t_cfg.micro_batch_size, m.hidden_size
    t = p.tp
    a, g = m.num_heads, m.num_kv_heads or m.num_heads
    d = h // a
    tokens = s * b
    tokens_local = tokens // t if p.sp else tokens
    if t_cfg.recompute == "full":
        return tokens_local * h * e  # megatron's checkpoint keeps the layer input only
    swiglu = m.activation == "swiglu"

    # --- attention block
    total = _norm_saved(cfg, tokens_local, e, device_type) + _adaln_extra(cfg, tokens_local, e)
    total += tokens_local * h * e  # input-norm output: linear_qkv's input (local under SP)
    qkv = tokens * (a + 2 * g) * d // t * e  # linear_qkv output, one storage (v is a view of it)
    q_k = tokens * (a + g) * d // t * e  # q and k after RoPE
    total += 4 * tokens * d * e  # RoPE: cos and sin [s, b, 1, d] computed for q and again for k
    out = tokens * a * d // t * e  # core-attention output = linear_proj's input
    lse = b * (a // t) * s * 4  # fp32 logsumexp [b, a/t, s]
    backend = m.attention
    if t_cfg.recompute == "selective":
        # megatron checkpoints core attention: it keeps q, k, v (the qkv storage) and the output
        total += qkv + q_k + out
    elif backend == "triton":
        total += tokens * (a + 2 * g) * d // t * e  # contiguous q, k, v copies [b, heads, s, d]
        total += 2 * out + lse  # kernel output [b, a/t, s, d] and its [s, b, h/t] copy
        total += 2 * b * s * 4  # doc_ids, span_ids as int32 (converted per call)
    elif backend == "sdpa" and device_type == "cuda" and g != a:
        total += 3 * tokens * a * d // t * e  # q and the repeated k, v (efficient kernel has no GQA)
        total += out + lse + b * s * s * e  # + the additive mask [b, 1, s, s]
    else:
        total += qkv + q_k + out + lse
        if backend == "sdpa":
            total += b * s * s * e  # the dense mask as [b, 1, s, s] in the dtype (CPU flash / CUDA efficient)
        elif backend == "flex" and device_type == "cpu":
            total += lse  # the eager op's second fp32 [b, a/t, s] statistic

    # --- FFN block
    total += _norm_saved(cfg, tokens_local, e, device_type) + _adaln_extra(cfg, tokens_local, e)
    moe = m.moe
    if moe.num_experts:
        k, n_exp = moe.top_k, moe.num_experts
        f_e = moe.ffn_hidden_size or m.ffn_hidden_size or 4 * h
        routed = tokens * k  # rows the experts of this rank run (TP ranks gather the sequence; EP balanced)
        total += tokens_local * h * e  # router input = pre-MLP norm output (the fp32 cast happens inside the router's autograd function)
        total += tokens_local * k * (4 + 8)  # top-k softmax probabilities (fp32) and indices (int64)
        total += routed * h * e  # permuted tokens: the experts' fc1 input
        total += routed * (4 + 8) + tokens * n_exp * 8  # permuted probs, permutation indices
        # experts (megatron SequentialMLP): fc1 out (2 f), up copy, silu, product, product * prob
        # (fc2's input); gelu: fc1 out, gelu, gelu * prob. megafusion's grouped experts keep no up copy.
        per_routed = (5 if moe.experts == "grouped" else 6) if swiglu else 3
        total += routed * f_e / t * e * per_routed
        f_sh = moe.shared_expert_ffn_hidden_size
        if f_sh:
            if moe.per_modality_shared_experts:
                total += _modality_ffn(tokens_local, tokens, h, f_sh / t, swiglu, e)
            else:
                total += _mlp(tokens, f_sh / t, swiglu, e)
    elif m.ffn == "modality":
        total += _modality_ffn(tokens_local, tokens, h, (m.ffn_hidden_size or 4 * h) / t, swiglu, e)
    else:
        total += tokens_local * h * e  # pre-MLP norm output: linear_fc1's input
        total += _mlp(tokens, (m.ffn_hidden_size or 4 * h) / t, swiglu, e)
    return int(total)


def _outside(cfg, first: bool, last: bool, device_type: str) -> int:
    m, p, t_cfg = cfg.model, cfg.parallel, cfg.train
    e = _BYTES[t_cfg.precision]
    s, b, h, t = m.seq_length, t_cfg.micro_batch_size, m.hidden_size, p.tp
    tokens = s * b
    tokens_local = tokens // t if p.sp else tokens
    total = 0
    # AdaLN: every stage sets its TimeContext; the fp32 time features are saved once by the
    # modulations under fp32 (under bf16 each norm saves its own cast, counted per layer)
    adaln = m.time_conditioning == "adaln"
    if adaln and t_cfg.recompute != "full":  # under full recompute the norms save nothing in the forward
        total += tokens * (FREQUENCY_DIM * 4 if e == 4 else 0) + tokens  # features + latent mask (bool)
    if first:
        if not adaln:
            # TimestepEmbedding: features cast to the dtype, Linear-SiLU-Linear hidden before and after SiLU
            total += tokens * FREQUENCY_DIM * e + 2 * tokens * h * e
        total += tokens  # where(latent, visual, text): the mask
        if p.sp and _norm_keeps_input(cfg, e, device_type):
            # the first layer's norm saves the scattered [s/t, b, h] slice, a view: the whole
            # embedding output [s, b, h] stays alive
            total += (tokens - tokens_local) * h * e
    if t_cfg.recompute == "full":
        total += tokens * (h // m.num_heads) * 4  # RoPE angles [s, b, 1, d] (fp32), a checkpoint argument
    if last:
        total += _norm_saved(cfg, tokens_local, e, device_type) + tokens_local * h * e  # final norm + output
        if b > 1:  # PatchOut's input: the [b, s, h] copy of the (gathered) final hidden states (a view at b = 1)
            total += tokens * h * e
        total += tokens * (m.vocab_size // t) * 4  # CE: fp32 softmax of the logits [s, b, V/t]
        total += tokens * (8 + 1) * (2 if t > 1 else 1)  # CE: int64 target ids and bool mask (+ the vocab-range ones at TP > 1)
    return int(total)


def activation_memory(cfg, packing=None, *, pp_rank: int = 0, device_type: str = "cuda",
                      num_microbatches: int | None = None) -> ActivationEstimate:
    """Activation bytes of pipeline rank ``pp_rank`` for ``cfg`` (a validated
    ``megafusion.config.Config``) at its 1F1B peak.

    ``packing`` (``megafusion.scaling.plan.Packing``, optional) is accepted for the image
    fraction of the sequence; in the layer as built the image-token terms do not depend on it
    (AdaLN modulates every position before ``where`` selects the latent ones; ModalityFFN and
    the per-modality shared experts run every token through one of two FFNs of equal width),
    so it only matters through the ModalityFFN padding, which is not modelled.
    ``num_microbatches``: micro-batches per step on a data-parallel rank (caps ``in_flight``;
    None = at least as many as the schedule holds). ``device_type``: ``cuda`` (the GPU
    kernels, see the module docstring for the assumptions) or ``cpu`` (what a CPU run saves).
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type = {device_type!r}: choose cpu or cuda")
    p = cfg.parallel
    if not 0 <= pp_rank < p.pp:
        raise ValueError(f"pp_rank = {pp_rank} is not a pipeline rank of parallel.pp = {p.pp}")
    vpp = p.vpp or 1
    layers = cfg.model.num_layers // p.pp
    return ActivationEstimate(
        per_layer=_per_layer(cfg, device_type),
        layers=layers,
        in_flight=in_flight_microbatches(p.pp, pp_rank, num_microbatches, p.vpp),
        outside_layers=_outside(cfg, first=pp_rank == 0, last=pp_rank == p.pp - 1, device_type=device_type),
        vpp=vpp,
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


__all__ = ["ActivationEstimate", "activation_memory", "in_flight_microbatches", "format_bytes"]

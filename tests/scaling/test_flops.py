"""FLOP and parameter accounting against brute force: the hybrid mask's pairs counted on
the dense N x N mask, and a tiny torch transformer whose every matmul torch's
FlopCounterMode sees (attention computed row by row over exactly the visible keys)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megafusion.model.embeddings import TimestepEmbedding, sinusoidal_embedding
from megafusion.model.unet import UNetDown, UNetUp

from megafusion.scaling.flops import (ModelShape, attention_pairs, flop_breakdown, format_mfu, gpu_model,
                                      matmul_dtype, mfu, nominal_packing, params, peak_flops,
                                      training_flops_per_step)

# --------------------------------------------------------------------------- packings


def hybrid_mask(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """[N, N] bool, the rule of megafusion/data/sample.py written out literally."""
    n = doc_ids.shape[0]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    same_doc = doc_ids[:, None] == doc_ids[None, :]
    same_span = (span_ids[:, None] >= 0) & (span_ids[:, None] == span_ids[None, :])
    return same_doc & ((j <= i) | same_span)


def random_packing(n: int, gen: torch.Generator, max_doc: int = 24, max_span: int = 6, span_size: int | None = None):
    """Documents of random length, each with contiguous image spans after a marker token
    (of ``span_size`` patches each - whole images - when given, else 1..max_span)."""
    doc_ids, span_ids, modality = [], [], []
    doc = span = 0
    while len(doc_ids) < n:
        length = int(torch.randint(1, max_doc + 1, (1,), generator=gen))
        pos = 0
        while pos < length:
            fits = pos + 2 < length if span_size is None else pos + span_size + 1 <= length
            if fits and torch.rand((), generator=gen) < 0.3:
                size = span_size or min(int(torch.randint(1, max_span + 1, (1,), generator=gen)), length - pos - 1)
                doc_ids += [doc] * (size + 1)
                span_ids += [-1] + [span] * size
                modality += [0] + [1 + int(torch.randint(0, 2, (1,), generator=gen))] * size
                span += 1
                pos += size + 1
            else:
                doc_ids.append(doc), span_ids.append(-1), modality.append(0)
                pos += 1
        doc += 1
    return (torch.tensor(doc_ids[:n]), torch.tensor(span_ids[:n]), torch.tensor(modality[:n]))


@pytest.mark.parametrize("seed", range(6))
def test_attention_pairs_match_dense_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = [random_packing(int(torch.randint(1, 80, (1,), generator=gen)), gen) for _ in range(3)]
    for doc_ids, span_ids, _ in rows:
        assert attention_pairs(doc_ids, span_ids) == int(hybrid_mask(doc_ids, span_ids).sum())
    # a batch [B, N]: rows reuse doc and span ids but never see each other
    n = 40
    batch = [random_packing(n, gen) for _ in range(3)]
    docs = torch.stack([b[0] for b in batch])
    spans = torch.stack([b[1] for b in batch])
    expected = sum(int(hybrid_mask(d, s).sum()) for d, s in zip(docs, spans))
    assert attention_pairs(docs, spans) == expected
    assert attention_pairs(docs.numpy(), spans.numpy()) == expected


def test_attention_pairs_non_contiguous_spans_and_spans_across_documents():
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        docs = torch.sort(torch.randint(0, 4, (n,), generator=gen)).values
        spans = torch.randint(-1, 3, (n,), generator=gen)  # scattered, shared by documents
        assert attention_pairs(docs, spans) == int(hybrid_mask(docs, spans).sum())


def test_nominal_packing_layout():
    docs, spans, mod = nominal_packing(20, doc_length=10, span_length=3, spans_per_doc=2)
    assert docs.tolist() == [0] * 10 + [1] * 10
    assert mod.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1] * 2  # spans close the document, a marker before each
    assert (mod != 0).sum() == 12 and ((spans >= 0) == (mod != 0)).all()
    assert len(set(spans[spans >= 0].tolist())) == 4
    with pytest.raises(ValueError, match="do not fit"):
        nominal_packing(8, doc_length=8, span_length=4, spans_per_doc=2)


# --------------------------------------------------------------------------- a tiny model


class FFN(nn.Module):
    def __init__(self, hidden: int, width: int, gated: bool):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(hidden, width, bias=False)
        self.gate = nn.Linear(hidden, width, bias=False) if gated else None
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        y = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))
        return self.down(y)


class MoE(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.k = s.moe_top_k
        self.router = nn.Linear(s.hidden_size, s.num_experts, bias=False)
        self.experts = nn.ModuleList(FFN(s.hidden_size, s.expert_ffn, s.gated_ffn) for _ in range(s.num_experts))
        self.shared = nn.ModuleList(FFN(s.hidden_size, s.shared_ffn, s.gated_ffn)
                                    for _ in range(s.shared_expert_copies)) if s.shared_ffn else None

    def forward(self, x, modality):
        weights, chosen = torch.topk(torch.softmax(self.router(x), -1), self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if self.shared is not None:  # per-modality shared experts: each position uses its own
            for m, shared in enumerate(self.shared):
                rows = (modality.clamp(max=len(self.shared) - 1) == m).nonzero(as_tuple=True)[0]
                if len(rows):
                    out = out.index_add(0, rows, shared(x[rows]))
        return out


class Layer(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        h, d = s.hidden_size, s.head_dim
        self.s = s
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        if s.time_conditioning == "adaln":  # DiT modulation of both pre-norms, latent positions only
            self.mod1, self.mod2 = (nn.Linear(s.time_frequency_dim, 2 * h, bias=False) for _ in range(2))
        self.q = nn.Linear(h, h, bias=False)
        self.k = nn.Linear(h, s.kv_heads * d, bias=False)
        self.v = nn.Linear(h, s.kv_heads * d, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.ffn = MoE(s) if s.num_experts else FFN(h, s.ffn, s.gated_ffn)

    def attend(self, x, mask):
        """Exactly one q.k and one p.v product per visible (query, key) pair."""
        s, n = self.s, x.shape[0]
        q = self.q(x).view(n, s.num_heads, 1, s.head_dim)
        rep = s.num_heads // s.kv_heads
        k = self.k(x).view(n, s.kv_heads, s.head_dim).repeat_interleave(rep, dim=1)
        v = self.v(x).view(n, s.kv_heads, s.head_dim).repeat_interleave(rep, dim=1)
        rows = []
        for i in range(n):
            keys = mask[i].nonzero(as_tuple=True)[0]
            kt = k[keys].permute(1, 2, 0)  # [H, d, visible]
            p = torch.softmax(torch.bmm(q[i], kt) / s.head_dim ** 0.5, -1)  # [H, 1, visible]
            rows.append(torch.bmm(p, v[keys].permute(1, 0, 2)).reshape(-1))  # [H * d]
        return self.o(torch.stack(rows))

    def norm(self, which, x, lat, features):
        y = getattr(self, f"norm{which}")(x)
        if self.s.time_conditioning != "adaln" or not len(lat):
            return y
        shift, scale = getattr(self, f"mod{which}")(features).chunk(2, dim=-1)
        return y.index_put((lat,), y[lat] * (1 + scale) + shift)

    def forward(self, x, mask, modality, lat, features):
        x = x + self.attend(self.norm(1, x, lat, features), mask)
        y = self.norm(2, x, lat, features)
        return x + (self.ffn(y, modality) if self.s.num_experts else self.ffn(y))


class TinyTransfusion(nn.Module):
    """A literal Transfusion forward whose every matmul is one the accounting counts: the
    real U-Net adapters and timestep embedding of megafusion.model, on latent positions."""

    def __init__(self, s: ModelShape):
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_layers))
        self.norm = nn.RMSNorm(s.hidden_size)
        self.head = None if s.tie_embeddings else nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        if s.patch_adapter == "unet":
            self.patch_in = UNetDown(s.latent_channels, s.latent_patch_size, s.hidden_size, s.unet_channels)
            self.patch_out = UNetUp(s.latent_channels, s.latent_patch_size, s.hidden_size, s.unet_channels)
        elif s.latent_dim:
            self.patch_in = nn.Linear(s.latent_dim, s.hidden_size)
            self.patch_out = nn.Linear(s.hidden_size, s.latent_dim)
        if s.time_conditioning == "additive":
            self.time_embed = TimestepEmbedding(s.hidden_size, s.time_frequency_dim)

    def adapt(self, adapter, x, t):
        if self.s.patch_adapter != "unet":
            return adapter(x)
        images = x.view(-1, self.s.tokens_per_image, x.shape[-1])  # whole images, in order
        return adapter(images, t.view(-1, self.s.tokens_per_image)[:, 0]).reshape(x.shape[0], -1)

    def forward(self, tokens, latents, t, doc_ids, span_ids, modality):
        mask = hybrid_mask(doc_ids, span_ids)
        text = (modality == 0).nonzero(as_tuple=True)[0]
        lat = (modality != 0).nonzero(as_tuple=True)[0]
        features = sinusoidal_embedding(t[lat], self.s.time_frequency_dim)
        x = self.embed(tokens)
        if len(lat):
            visual = self.adapt(self.patch_in, latents[lat], t[lat])
            if self.s.time_conditioning == "additive":
                visual = visual + self.time_embed(t[lat])
            x = x.index_put((lat,), visual)
        for layer in self.layers:
            x = layer(x, mask, modality, lat, features)
        x = self.norm(x)
        head = self.embed.weight if self.head is None else self.head.weight
        out = (x[text] @ head.t()).square().mean()
        if len(lat):
            out = out + self.adapt(self.patch_out, x[lat], t[lat]).square().mean()
        return out


SHAPES = {
    "dense_swiglu": ModelShape(hidden_size=16, num_layers=2, num_heads=4, vocab_size=23, ffn_hidden_size=24,
                               latent_dim=6),
    "dense_gelu_gqa_untied": ModelShape(hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=19,
                                        latent_dim=5, gated_ffn=False, tie_embeddings=False, ffn_hidden_size=40),
    "moe_shared_per_modality": ModelShape(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=17,
                                          latent_dim=4, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=8,
                                          shared_expert_ffn_hidden_size=12, shared_expert_copies=2),
    "text_only": ModelShape(hidden_size=8, num_layers=2, num_heads=2, vocab_size=29),
    "additive_time": ModelShape(hidden_size=16, num_layers=2, num_heads=4, vocab_size=23, ffn_hidden_size=24,
                                latent_dim=6, time_conditioning="additive"),
    "adaln_time": ModelShape(hidden_size=16, num_layers=2, num_heads=4, vocab_size=23, ffn_hidden_size=24,
                             latent_dim=6, time_conditioning="adaln"),
    # U-Net adapters: pixel-like latents (3 channels, 4x4 patches -> two levels) and RAE-like (patch 1)
    "unet_pixel": ModelShape(hidden_size=16, num_layers=1, num_heads=2, vocab_size=23, latent_dim=48,
                             patch_adapter="unet", latent_channels=3, latent_patch_size=4, tokens_per_image=4,
                             unet_channels=8, time_conditioning="additive"),
    "unet_rae_adaln": ModelShape(hidden_size=16, num_layers=1, num_heads=2, vocab_size=23, latent_dim=6,
                                 patch_adapter="unet", latent_channels=6, latent_patch_size=1, tokens_per_image=9,
                                 unet_channels=8, time_conditioning="adaln"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_training_flops_match_torch_flop_counter(name):
    s = SHAPES[name]
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    n = 40
    doc_ids, span_ids, modality = random_packing(n, gen, span_size=s.tokens_per_image or None)
    if not s.latent_dim:
        span_ids = torch.full_like(span_ids, -1)
        modality = torch.zeros_like(modality)
    assert (modality != 0).any() == bool(s.latent_dim)
    model = TinyTransfusion(s)
    tokens = torch.randint(0, s.vocab_size, (n,), generator=gen)
    latents = torch.randn(n, max(s.latent_dim, 1), generator=gen, requires_grad=True)
    t = torch.rand(n, generator=gen, requires_grad=True)  # input gradients everywhere: the 6ND convention
    with FlopCounterMode(display=False) as counter:
        model(tokens, latents, t, doc_ids, span_ids, modality).backward()
    assert training_flops_per_step(s, doc_ids, span_ids, modality) == counter.get_total_flops()

    # parameters: everything, and what one position uses
    total = sum(p.numel() for p in model.parameters())
    count = params(s)
    assert count.total == total
    idle = 0
    if s.num_experts:
        idle += (s.num_experts - s.moe_top_k) * sum(p.numel() for p in model.layers[0].ffn.experts[0].parameters())
        idle += (s.shared_expert_copies - 1) * sum(p.numel() for p in model.layers[0].ffn.shared[0].parameters())
        idle *= s.num_layers
    assert count.active == total - idle
    assert count.embedding == s.vocab_size * s.hidden_size * (1 if s.tie_embeddings else 2)


def test_flops_of_a_batch_add_up_and_latents_need_a_latent_width():
    s = SHAPES["dense_swiglu"]
    gen = torch.Generator().manual_seed(5)
    a, b = random_packing(32, gen), random_packing(32, gen)
    batched = training_flops_per_step(s, *(torch.stack([x, y]) for x, y in zip(a, b)))
    assert batched == training_flops_per_step(s, *a) + training_flops_per_step(s, *b)
    parts = flop_breakdown(s, *a)
    assert parts.training == 3 * parts.forward and parts.router == 0
    with pytest.raises(ValueError, match="latent_dim"):
        training_flops_per_step(SHAPES["text_only"], *a)


def test_from_model_config_reads_trainer_keys_and_defaults():
    s = ModelShape.from_model_config({"hidden_size": 32, "num_layers": 3, "num_heads": 4, "activation": "gelu",
                                      "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 16}})
    assert (s.ffn, s.expert_ffn, s.gated_ffn, s.vocab_size, s.kv_heads) == (128, 16, False, 256, 4)
    assert s.time_conditioning == "none" and s.latent_dim == 0  # text-only: no time conditioning
    t = ModelShape.from_model_config({"kind": "transfusion", "latent_dim": 12, "patch_adapter": "unet",
                                      "unet_layout": [3, 2, 16], "time_conditioning": "adaln"})
    assert (t.latent_channels, t.latent_patch_size, t.tokens_per_image, t.time_conditioning) == (3, 2, 16, "adaln")
    assert ModelShape.from_model_config({"latent_dim": 12}).time_conditioning == "additive"  # the trainer default
    with pytest.raises(ValueError, match="unet_layout"):
        ModelShape.from_model_config({"latent_dim": 12, "patch_adapter": "unet"})
    with pytest.raises(ValueError, match="latent_channels"):
        ModelShape.from_model_config({"latent_dim": 12, "patch_adapter": "unet", "unet_layout": [3, 3, 16]})
    with pytest.raises(ValueError, match="patch_adapter"):
        ModelShape(hidden_size=8, num_layers=1, num_heads=2, vocab_size=8, latent_dim=4, patch_adapter="mlp")
    with pytest.raises(ValueError, match="not divisible"):
        ModelShape(hidden_size=30, num_layers=1, num_heads=4, vocab_size=8)


# --------------------------------------------------------------------------- MFU


def test_mfu_uses_documented_peaks_and_never_guesses():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") == pytest.approx(1978.9e12)
    assert peak_flops("NVIDIA H200", "bfloat16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") < peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert mfu(494.7e12, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(0.5)
    assert mfu(1e12, "NVIDIA A100-PCIE-40GB", "fp8") is None  # A100 has no fp8
    for unknown in ("NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA H100", "cpu", ""):
        assert mfu(1e12, unknown, "bf16") is None, unknown
    assert format_mfu(None) == "unknown" and format_mfu(0.4123) == "41.2%"
    with pytest.raises(ValueError, match="dtype"):
        mfu(1e12, "NVIDIA H200", "int4")
    # FP8 training divides by the FP8 peak, not the bf16 one it keeps as train.precision
    assert matmul_dtype("bf16", "tensorwise") == matmul_dtype("bf16", "delayed") == "fp8"
    assert matmul_dtype("bf16", "none") == "bf16" and matmul_dtype("fp32") == "fp32"
    assert mfu(989.45e12, "NVIDIA H100 80GB HBM3", matmul_dtype("bf16", "delayed")) == pytest.approx(0.5)


def test_blackwell_peaks_so_mfu_is_not_null_on_b200_gb200():
    """Dense peaks from NVIDIA's GB200 NVL72 / HGX B200 specifications (sparse figures / 2)."""
    assert gpu_model("NVIDIA B200") == "B200"
    assert gpu_model("NVIDIA GB200") == "GB200"
    assert gpu_model("NVIDIA GH200 480GB") == "GH200"
    assert gpu_model("NVIDIA B2000") is None and gpu_model("NVIDIA RTX PRO 6000 Blackwell") is None
    assert peak_flops("NVIDIA B200", "bf16") == pytest.approx(2250e12)
    assert peak_flops("NVIDIA B200", "fp8") == pytest.approx(4500e12)
    assert peak_flops("NVIDIA B200", "tf32") == pytest.approx(1100e12)
    assert peak_flops("NVIDIA GB200", "bfloat16") == pytest.approx(2500e12)
    assert peak_flops("NVIDIA GB200", "fp8") == pytest.approx(5000e12)
    assert peak_flops("NVIDIA GB200", "tf32") == pytest.approx(1250e12)
    # every mxfp8 run on Blackwell divides by the FP8 peak
    assert mfu(2250e12, "NVIDIA B200", matmul_dtype("bf16", "mxfp8")) == pytest.approx(0.5)

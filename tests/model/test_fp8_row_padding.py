"""FP8 row padding of the per-modality FFN and the per-modality shared experts (CPU, gloo).

Each modality's FFN runs on that modality's tokens only, so its linears see arbitrary row
counts; Transformer Engine's FP8 GEMMs reject leading dimensions that are not multiples of
16 (32 for MXFP8). Under FP8 the rows are padded with zeros to that multiple and the padding
is dropped after. Here the padding is forced on (an explicit multiple, or an FP8 config
with local linears): the output and gradients equal the unpadded computation and every
linear sees a multiple of the row count.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from megafusion.config import load_config
from megafusion.data.sample import IMAGE, TEXT, VIDEO
from megafusion.model.ffn import ffn_spec
from megafusion.model.modality_ffn import ModalityFFN, fp8_row_multiple
from megafusion.model.routing import ModalityContext

HIDDEN, FFN, SEQ, BATCH = 16, 24, 11, 2  # 22 tokens: no modality's count is a multiple of 16
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=8",
       "model.moe.shared_expert_ffn_hidden_size=12", "model.moe.per_modality_shared_experts=true"]


def _config(*overrides):
    return load_config(overrides=[f"model.hidden_size={HIDDEN}", f"model.ffn_hidden_size={FFN}", "model.num_heads=2",
                                  "model.num_layers=2", "model.kind=transfusion", *overrides])


def _tc(cfg):
    from megafusion.model.transformer_config import build_transformer_config

    return build_transformer_config(cfg, torch.device("cpu"))


def _pgs():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _modality():
    mod = torch.randint(0, 3, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    mod[0, 0], mod[0, 1], mod[1, 0] = TEXT, IMAGE, VIDEO
    return mod


def _rows_seen(ffn: ModalityFFN) -> list[int]:
    """Records the row count (leading dims) of every input of the FFN's linears."""
    seen: list[int] = []
    for mlp in (ffn.text_mlp, ffn.vision_mlp):
        for linear in (mlp.linear_fc1, mlp.linear_fc2):
            linear.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[:-1].numel()))
    return seen


def _run(module, ctx, x, weight):
    ctx.set(_modality())
    xg = x.clone().requires_grad_()
    out, _ = module(xg)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return out.detach(), xg.grad, grads


def test_row_multiple_follows_the_fp8_recipe():
    assert fp8_row_multiple(SimpleNamespace(fp8=None, fp8_recipe="delayed")) == 1
    assert fp8_row_multiple(SimpleNamespace(fp8="hybrid", fp8_recipe="delayed")) == 16
    assert fp8_row_multiple(SimpleNamespace(fp8="hybrid", fp8_recipe="tensorwise")) == 16
    assert fp8_row_multiple(SimpleNamespace(fp8="e4m3", fp8_recipe="mxfp8")) == 32


@pytest.mark.parametrize("multiple", [16, 32])
def test_modality_ffn_padded_equals_unpadded(megatron_world, multiple):
    cfg = _config("model.ffn=modality")
    tc = _tc(cfg)
    ctx = ModalityContext()
    torch.manual_seed(0)
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=_pgs(), is_mtp_layer=False, name="mlp")
    assert isinstance(ffn, ModalityFFN) and ffn.row_multiple == 1  # no FP8: no padding
    x, weight = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)
    plain_seen = _rows_seen(ffn)
    expected = _run(ffn, ctx, x, weight)
    assert any(rows % 16 for rows in plain_seen)  # the unpadded row counts FP8 would reject
    plain_seen.clear()
    ffn.row_multiple = multiple  # what FP8 sets (fp8_row_multiple)
    got = _run(ffn, ctx, x, weight)
    seen = plain_seen
    assert len(seen) == 4 and all(rows % multiple == 0 for rows in seen), seen
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_fp8_config_turns_the_padding_on(megatron_world):
    """An FP8 TransformerConfig (local linears stand in for TE's) pads without being told."""
    cfg = _config("model.ffn=modality")
    tc = copy.copy(_tc(cfg))
    tc.fp8, tc.fp8_recipe = "hybrid", "tensorwise"
    ctx = ModalityContext()
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=_pgs(), is_mtp_layer=False, name="mlp")
    assert ffn.row_multiple == 16
    tc_mx = copy.copy(tc)
    tc_mx.fp8, tc_mx.fp8_recipe = "e4m3", "mxfp8"
    assert ffn_spec(cfg, tc_mx, ctx)(config=tc_mx, pg_collection=_pgs(), is_mtp_layer=False).row_multiple == 32
    seen = _rows_seen(ffn)
    ctx.set(_modality())
    ffn(torch.randn(SEQ, BATCH, HIDDEN))
    assert seen and all(rows % 16 == 0 for rows in seen), seen


def test_moe_per_modality_shared_experts_padded_equals_unpadded(megatron_world):
    cfg = _config(*MOE)
    tc = _tc(cfg)
    ctx = ModalityContext()
    torch.manual_seed(0)
    layer = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=_pgs(), is_mtp_layer=False, name="mlp")
    layer.set_layer_number(2)
    ctx.recording = False
    shared = layer.modality_shared_experts
    assert isinstance(shared, ModalityFFN) and shared.row_multiple == 1
    x, weight = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)
    expected = _run(layer, ctx, x, weight)
    shared.row_multiple = 32
    seen = _rows_seen(shared)
    got = _run(layer, ctx, x, weight)
    assert len(seen) == 4 and all(rows % 32 == 0 for rows in seen), seen
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-5, atol=1e-6, msg=name)

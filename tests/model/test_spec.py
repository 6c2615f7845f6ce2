"""Layer specs: the local spec uses our SP-aware norm; the TE spec needs Transformer Engine."""

import importlib.util

import pytest

from megafusion.model.norm import Norm
from megafusion.model.spec import local_layer_spec, te_layer_spec

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def test_local_spec_uses_sequence_parallel_norm():
    spec = local_layer_spec(num_experts=None)
    assert spec.submodules.input_layernorm is Norm and spec.submodules.pre_mlp_layernorm is Norm


def test_norm_marks_parameters_for_sequence_parallel():
    class Cfg:
        normalization = "RMSNorm"
        sequence_parallel = True

    norm = Norm(Cfg(), hidden_size=8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed; the missing-TE error cannot occur")
def test_te_spec_without_te_says_what_to_do():
    with pytest.raises(RuntimeError, match="model.spec = te needs Transformer Engine.*model.spec = local"):
        te_layer_spec(num_experts=None)


@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine (GPU extra: pip install 'megafusion[gpu]')")
def test_te_spec_builds_with_te():
    spec = te_layer_spec(num_experts=None)
    assert "transformer_engine" in spec.submodules.self_attention.submodules.linear_qkv.__module__


# --------------------------------------------------------------------------- the Transfusion block


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed; the missing-TE error cannot occur")
def test_transfusion_te_spec_without_te_says_what_to_do():
    from megafusion.model.spec import transfusion_block_spec

    with pytest.raises(RuntimeError, match="model.spec = te needs Transformer Engine.*model.spec = local"):
        transfusion_block_spec(None, "sdpa", None, spec="te")


def test_transfusion_with_te_spec_is_refused_at_startup_on_cpu(monkeypatch):
    """On a machine without CUDA (or TE) validation names what is missing and the way out."""
    import torch

    from megafusion.config import ConfigError, load_config, validate

    from conftest import CONFIGS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", ["model.spec=te"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    message = str(err.value)
    assert "model.spec = te needs a CUDA GPU" in message and "use model.spec = local" in message
    if not HAVE_TE:
        assert "needs Transformer Engine, which is not installed" in message


@pytest.mark.parametrize("adaln", [False, True])
def test_transfusion_te_spec_keeps_our_hybrid_attention(monkeypatch, megatron_world, adaln):
    """The te block: TE linears and norms around *our* core attention with the arbitrary mask
    (so the hybrid mask still applies); AdaLN norms get an unfused QKV linear."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megafusion.model import spec as spec_module
    from megafusion.model.attention import FlexCoreAttention

    monkeypatch.setattr(spec_module, "require_transformer_engine", lambda: None)  # the spec is data; nothing is built
    config = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4)
    mlp, norm = object(), (object() if adaln else None)
    block = spec_module.transfusion_block_spec(config, "flex", None, mlp_spec=mlp, norm_spec=norm, spec="te")
    assert len(block.layer_specs) == 3 and block.layer_norm is te_ext.TENorm
    layer = block.layer_specs[0].submodules
    attn = layer.self_attention
    assert attn.params["attn_mask_type"] is AttnMaskType.arbitrary
    assert attn.submodules.core_attention is FlexCoreAttention
    assert attn.submodules.linear_proj is te_ext.TERowParallelLinear
    assert layer.mlp is mlp
    if adaln:
        assert layer.input_layernorm is norm and layer.pre_mlp_layernorm is norm
        assert attn.submodules.linear_qkv is te_ext.TEColumnParallelLinear
    else:
        assert layer.input_layernorm is IdentityOp  # fused into the QKV linear
        assert attn.submodules.linear_qkv is te_ext.TELayerNormColumnParallelLinear
        assert layer.pre_mlp_layernorm is te_ext.TENorm
    # the local spec of the same block: megatron's torch modules, same attention
    local = spec_module.transfusion_block_spec(config, "flex", None, mlp_spec=mlp, norm_spec=norm).layer_specs[0]
    assert local.submodules.self_attention.submodules.core_attention is FlexCoreAttention
    assert local.submodules.self_attention.submodules.linear_qkv is not attn.submodules.linear_qkv

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

"""Public custom ops of megafusion: the Triton kernels of ``kernels/megafusion_kernels/``
(imported as ``megafusion_kernels``).

    from megafusion.ops import grouped_mlp, hybrid_attention, moe_permute, moe_unpermute
"""
from megafusion_kernels.grouped_mlp import grouped_mlp  # noqa: F401
from megafusion_kernels.moe_dispatch import moe_permute, moe_unpermute  # noqa: F401
from megafusion_kernels.hybrid_attention import hybrid_attention  # noqa: F401

__all__ = ["grouped_mlp", "hybrid_attention", "moe_permute", "moe_unpermute"]

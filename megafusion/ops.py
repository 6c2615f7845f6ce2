"""Public custom ops of megafusion (the Triton kernels of ``kernels/``).

    from megafusion.ops import hybrid_attention, moe_permute, moe_unpermute
"""

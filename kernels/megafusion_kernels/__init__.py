"""Triton kernels of megafusion, imported as ``megafusion_kernels``.

Pure functions on tensors: nothing here imports ``megafusion`` or megatron-core.
"""

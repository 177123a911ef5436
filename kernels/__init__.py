"""Hand-written Triton kernels for block-sparse matmul (installed as ``sparsecore.kernels``)."""

"""Hand-written Triton kernels for block-sparse matmul (installed as ``sparsecore.kernels``).

One kernel per module, each with a host launcher taking the ``BlockSparseWeight`` tensors::

    bsr_fwd     y = act(x @ W^T + bias)    prefill / training forward (M > 64)
    bsr_decode  same, small M              stream-K over the kept blocks + epilogue pass
    bsr_dx      dX = dY @ W                through the CSC (transposed) metadata
    bsr_dw      dV = dY^T X, kept blocks   sampled product, optional M split
    configs     launch configs: tuned_configs.json, else heuristics
    common      the MMA step and the fused epilogue shared by the kernels

The backend (``sparsecore.backends.triton``) registers them as ``torch.library.triton_op``
ops (``torch.ops.sparsecore.triton_bsr_linear*``) for torch.compile and other libraries.
Submodules import ``triton``; this package itself does not.
"""

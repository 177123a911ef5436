"""Compiler flags for ``sparsecore._C`` (imported by ``setup.py``; kept beside the sources).

Environment:
  SPARSECORE_CUDA_ARCHS="80;90a"   archs to build SASS for; the lowest also ships as PTX so
                                   newer GPUs can JIT the sm80/decode kernels. "90a" builds
                                   the wgmma kernel (and defines SPARSECORE_HAS_SM90A).
  SPARSECORE_PTXAS_VERBOSE=1       pass -Xptxas -v (registers, spills, smem per kernel)
"""
from __future__ import annotations

import os
import re

DEFAULT_ARCHS = "80;90a"
CSRC = os.path.dirname(os.path.abspath(__file__))


def parse_archs(spec: str) -> list[str]:
    """``"80;90a"`` -> ``["80", "90a"]`` (also accepts commas, spaces, dots: ``"8.0 9.0a"``)."""
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", spec.strip()) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}a?", a) or int(a.rstrip("a")) < 80]
    if not archs or bad:
        raise ValueError(f"SPARSECORE_CUDA_ARCHS: expected archs >= 80 such as '80;90a', got {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = min((a for a in archs if not a.endswith("a")), key=int, default=None)
    if lowest is not None:  # portable PTX for GPUs newer than any listed arch
        flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")
    return flags


def extension_kwargs(cuda_home: str) -> dict:
    """Keyword arguments for ``torch.utils.cpp_extension.CUDAExtension``."""
    archs = parse_archs(os.environ.get("SPARSECORE_CUDA_ARCHS", DEFAULT_ARCHS))
    defines = ["-DSPARSECORE_HAS_SM90A"] if "90a" in archs else []
    nvcc = ["-O3", "-lineinfo", *gencode_flags(archs), *defines]
    if os.environ.get("SPARSECORE_PTXAS_VERBOSE", "0") == "1":
        nvcc += ["-Xptxas", "-v"]
    # No --use_fast_math: the epilogue's erff/expf (gelu, silu) keep full precision.
    return {
        "include_dirs": [CSRC, os.path.join(cuda_home, "include")],
        "extra_compile_args": {"cxx": ["-O3"], "nvcc": nvcc},
    }

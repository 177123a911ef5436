"""Whether ``sparsecore._C`` can be built here, and its compiler flags (imported by ``setup.py``
and the build tests; kept beside the sources).

Environment:
  SPARSECORE_SKIP_CUDA_BUILD=1     skip the extension
  CUDA_HOME                        toolkit root (default: found by torch)
  SPARSECORE_CUDA_ARCHS="80;90a"   archs to build SASS for; the lowest also ships as PTX so
                                   newer GPUs can JIT the sm80/decode kernels. "90a" builds
                                   the wgmma kernel (and defines SPARSECORE_HAS_SM90A).
  SPARSECORE_PTXAS_VERBOSE=1       pass -Xptxas -v (registers, spills, smem per kernel)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Optional

DEFAULT_ARCHS = "80;90a"
CSRC = os.path.dirname(os.path.abspath(__file__))


def toolkit(torch) -> tuple[Optional[str], Optional[str]]:
    """``(cuda_home, None)`` when the extension can be built against this ``torch``, else
    ``(None, why not)``. Decided from the toolchain, never from ``torch.cuda.is_available()``."""
    if os.environ.get("SPARSECORE_SKIP_CUDA_BUILD", "0") == "1":
        return None, "SPARSECORE_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, "no CUDA toolkit (nvcc) found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    have = (int(found[1]), int(found[2])) if found else None
    major = int(torch.version.cuda.split(".")[0])
    if have is None or have[0] != major:  # torch's build refuses to mix major versions
        return None, (f"{nvcc} is CUDA {'.'.join(map(str, have)) if have else '(unknown version)'}, torch "
                      f"{torch.__version__} was built with CUDA {torch.version.cuda}: set CUDA_HOME to a CUDA "
                      f"{major}.x toolkit")
    if have < (12, 0):
        return None, f"{nvcc} is CUDA {have[0]}.{have[1]}: the kernels need CUDA 12 or newer (wgmma, clusters)"
    return home or os.path.dirname(os.path.dirname(nvcc)), None


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

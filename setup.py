"""Build script.

Installs the pure-Python package everywhere. Builds the CUDA extension ``sparsecore._C``
from ``csrc/`` only when a CUDA toolkit (nvcc) *and* a CUDA build of torch are present —
decided from the toolchain, never from ``torch.cuda.is_available()``, so a GPU-less build
machine still produces GPU binaries. It never fails hard: without the toolchain (or with
``SPARSECORE_SKIP_CUDA_BUILD=1``) the install is pure Python and the package falls back to
the Triton / torch backends at run time.

Environment:
  SPARSECORE_SKIP_CUDA_BUILD=1   skip the extension
  SPARSECORE_CUDA_ARCHS="80;90a" archs to build (default)
  MAX_JOBS                       parallel nvcc jobs (honoured by torch's ninja build)
  CUDA_HOME                      toolkit root (default: found by torch)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sparsecore", "sparsecore.prune", "sparsecore.backends", "sparsecore.kernels"]
PACKAGE_DIR = {"sparsecore": "sparsecore", "sparsecore.kernels": "kernels"}


def _log(msg):
    print(f"[sparsecore setup] {msg}", file=sys.stderr)


def _cuda_extension():
    """Return ([ext], cmdclass) or ([], {}) when the CUDA build is not possible."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch missing from the build env: pure-Python install
        _log(f"torch not importable ({e}): pure-Python install")
        return [], {}
    from sparsecore_build import extension_kwargs, toolkit  # csrc build rules live beside csrc/

    cuda_home, why_not = toolkit(torch)
    if why_not:
        _log(f"{why_not}: pure-Python install (sparsecore._C not built)")
        return [], {}
    ext = cpp_extension.CUDAExtension(name="sparsecore._C", sources=sources, **extension_kwargs(cuda_home))
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


# `/usr/local/bin/nvcc` wrappers make torch guess CUDA_HOME=/usr/local (no lib64/cudart):
# prefer the real toolkit when the user did not choose one.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
sys.path.insert(0, os.path.join(ROOT, "csrc"))
ext_modules, cmdclass = _cuda_extension()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"sparsecore": ["data/*.txt", "data/*.csv"], "sparsecore.kernels": ["tuned_configs.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

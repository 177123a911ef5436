"""Console script ``sparsecore``: ``demo`` (the main job), ``bench``, ``sparsify``, ``info``."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import SparseCoreError


def _info(args) -> int:
    import torch

    from . import backends

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name in backends.NAMES:
        ok, why = backends.module(name).available()
        print(f"backend {name:7s} {'available' if ok else 'unavailable: ' + why}")
    if backends.module("cuda")._load() is None:  # built: say for which kernels (without a GPU too)
        print(f"sparsecore._C   built; sm_90a wgmma kernel: {'yes' if torch.ops.sparsecore.cuda_has_sm90a() else 'no'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsecore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and which backends are available").set_defaults(fn=_info)
    from . import bench, demo, hf  # each adds its own sub-command

    demo.add_parser(sub)
    bench.add_parser(sub)
    hf.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (SparseCoreError, OSError) as e:  # bad flags and unusable paths: one line, as argparse's own
        if args.verbose:
            raise
        print(f"sparsecore {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

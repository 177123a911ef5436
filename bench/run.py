"""``python bench/run.py [flags]`` (or ``python -m bench.run``): same as ``sparsecore bench``."""
import sys

from sparsecore.bench import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m t2v.sample: prompt in, video file out (docs/cli.md)."""

import sys

from t2v.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m t2v.eval: the demo model's prompt-following evaluation (docs/quality.md)."""

import sys

from t2v.demo.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

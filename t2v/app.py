"""python -m t2v.app: the web UI (docs/app.md)."""

import sys

from t2v.cli.app import main

if __name__ == "__main__":
    sys.exit(main())

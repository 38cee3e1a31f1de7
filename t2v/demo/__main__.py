"""python -m t2v.demo: reproduce the shipped demo model (docs/demo.md)."""

import sys

from t2v.demo.recipe import main

sys.exit(main())

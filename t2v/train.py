"""python -m t2v.train: fine-tuning and training (docs/finetuning.md)."""

import sys

from t2v.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m t2v.train: fine-tuning and training (docs/finetuning.md)."""

from t2v.process_end import end_process
from t2v.training.trainer import main

if __name__ == "__main__":
    end_process(main())

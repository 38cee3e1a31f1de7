"""python -m t2v.sample: prompt in, video file out (docs/cli.md)."""

from t2v.cli.sample import main
from t2v.process_end import end_process

if __name__ == "__main__":
    end_process(main())

import logging
import os

import torch

# One attention backend and deterministic CPU maths on both sides of every comparison.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("t2v").setLevel(logging.INFO)


def pytest_addoption(parser):
    parser.addoption("--app-screenshot", default=None, metavar="PNG",
                     help="tests/test_app.py: save the page after its generation (docs/app.png)")

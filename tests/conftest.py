import logging
import os

import pytest
import torch

# One attention backend and deterministic CPU maths on both sides of every comparison.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("t2v").setLevel(logging.INFO)


def pytest_addoption(parser):
    parser.addoption("--app-screenshot", default=None, metavar="PNG",
                     help="tests/test_app.py: save the page after its generation (docs/app.png)")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (torchrun processes run with OMP_NUM_THREADS=1: so
    does the reference computed in the test process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""t2v/process_end.py: under torchrun (WORLD_SIZE > 1) a command leaves with os._exit after
flushing (no interpreter finalization, so no gloo worker thread is ended inside a C++ destructor);
alone it leaves with sys.exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, logging, sys
from t2v.process_end import end_process
atexit.register(lambda: print("finalized", flush=True))
logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.info("logged")
sys.stdout.write("unflushed")  # no newline, no flush: end_process must flush it
try:
    end_process(3)
except SystemExit:
    sys.stdout.write(" (SystemExit)")
    raise
"""


@pytest.mark.parametrize("world,finalized", [("2", False), ("1", True), (None, True)])
def test_end_process(world, finalized):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = str(ROOT)
    if world is not None:
        env["WORLD_SIZE"] = world
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stderr == "logged\n"
    if finalized:
        assert done.stdout == "unflushed (SystemExit)finalized\n"
    else:
        assert done.stdout == "unflushed"

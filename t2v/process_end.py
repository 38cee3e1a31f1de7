"""How a command's process ends: `sys.exit(code)`, or, in a process of a multi-process run
(torchrun set WORLD_SIZE > 1), `os._exit(code)` after flushing, so the interpreter is not
finalized.

Why: a gloo collective's `wait()` returns when the data has arrived, and the process group's
worker thread drops its reference to the collective's tensors a moment later. If Python code
dropped its own reference first, that last drop must take the GIL to free the tensor's Python
object. Should the main thread be finalizing the interpreter by then (a rank with nothing left to
do exits right after its last collective), Python ends the worker thread with `pthread_exit`
inside a C++ destructor, and the C++ runtime aborts the process ("terminate called without an
active exception", SIGABRT; seen with torch 2.14 and Python 3.11 in 19 of 100 runs of a script
that exits right after gathering DTensors, and once in CI on the FSDP distillation test; the
core dump: gloo's runLoop -> ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil ->
PyThread_exit_thread -> std::terminate, while the main thread was in Py_FinalizeEx). The
process group cannot be torn down first: FSDP and DTensor state keep it alive after
`destroy_process_group`. Leaving with `os._exit` skips finalization, so no thread is ended
mid-destructor. Everything a command writes is committed before it returns its exit code
(t2v/atomic.py); what `os._exit` skips is Python's atexit handlers, and t2v registers none.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def end_process(code: int | None) -> NoReturn:
    """Leave with `code` (None: 0), as described in the module docstring."""
    code = 0 if code is None else code
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

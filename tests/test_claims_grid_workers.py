"""Claim 4.4's grid workers end with the process that started them.

A ``verify`` killed with SIGKILL had left its workers asleep forever (re-parented to PID 1), holding the ``--out``
folder's lock, so that the next run into that folder was refused as "another theorylab run is writing into it".
"""

import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import time
from theorylab.claims.q4_weight_decay import grid_pool
pool = grid_pool(1)
print(pool.submit(__import__("os").getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too (it waits only for its parent to reap it)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(child.stdout.readline())
        assert _alive(worker)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the grid worker outlived its killed parent"
    finally:
        child.kill()
        child.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)

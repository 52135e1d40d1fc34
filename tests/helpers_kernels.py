"""The worker process the kernel tests run their cases in.

Under TRITON_INTERPRET=1 an out-of-bounds access kills the whole process, so each kernel case runs in a
spawned worker (one per test module, restarted if a case kills it): a crash fails that one test, not the
session. Case bodies must be module-level functions, so the worker can import them.
"""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest


class KernelProcess:
    def __init__(self):
        self._pool = None

    def run(self, case, *args):
        if self._pool is None:  # "spawn": a fresh interpreter, not a fork of pytest's state
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(case, *args).result()  # the child's exception re-raises here
        except BrokenProcessPool:
            self._pool = None
            pytest.fail(f"the kernel process died in {case.__name__}{args} "
                        "(under TRITON_INTERPRET an out-of-bounds access kills the process)")

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


@pytest.fixture(scope="module")
def kernel_process():
    proc = KernelProcess()
    yield proc
    proc.close()

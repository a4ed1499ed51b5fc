"""Suite-wide settings.

Under pytest-xdist (``make test`` runs ``-n 2``: one worker per core of the 2-core machines this
suite is sized for), every worker computes on one thread: two workers at torch's default of one
thread per core would oversubscribe the cores and run slower than one worker. No test depends on the
thread count: tests that compare two computations run both in the same process, and every recorded
value is pinned no tighter than its arithmetic guarantees (tests/test_dense_unchanged.py).
"""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

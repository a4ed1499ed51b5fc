"""``python -m distill.launch``: torchrun whose refused commands end in the ranks' one line.

Same arguments as ``torchrun`` (it *is* ``torch.distributed.run``)::

    python -m distill.launch --nproc-per-node 2 -m distill train gfl-tiny --data data/scenes --out runs/ddp

Why: when a rank exits with a code other than 0, torchrun's elastic agent logs the failure, stops
the other ranks and raises ``ChildFailedError``, which ``torchrun`` lets end in a Python traceback
and exit code 1, after the rank's clean ``error:`` line. That traceback is torch's, not detkd's;
this launcher runs the same agent and, when the failure is a detkd user error (a rank exited with
code 2 after recording its ``error:`` line in the agent's error file, see
:func:`distill.cli.app.report_error`), prints that line once (when rank 0 did not) and exits 2.
Any other failure (a bug, a signal) ends as under torchrun.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

USER_ERROR = 2  # distill.cli.app: a DetkdError exits with code 2


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent's own log lines (OMP notice, "closing signal SIGTERM", "failed (exitcode: 2)") would
    # surround the one line; a failure that is not a user error still raises with torch's report
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        user = {rank: f for rank, f in exc.failures.items() if f.exitcode == USER_ERROR and is_user_error(f.message)}
        if not user:
            raise
        if not rank0_reported(exc.failures):  # only another rank refused: print its line
            print(user[min(user)].message, file=sys.stderr)
        return USER_ERROR
    return 0


def is_user_error(message) -> bool:
    return isinstance(message, str) and message.startswith("error: ")


def rank0_reported(failures) -> bool:
    """Whether rank 0 printed its ``error:`` line: its error file holds it (written after the print).

    Rank 0 may have been stopped by the agent (SIGTERM) after printing, when another rank exited
    first; its error file is then read from the agent's folder, next to the other ranks' files
    (``.../attempt_N/LOCAL_RANK/error.json``).
    """
    if 0 in failures and is_user_error(failures[0].message):
        return True
    for failure in failures.values():
        if failure.error_file and os.path.isfile(failure.error_file):
            sibling = Path(failure.error_file).parent.parent / "0" / Path(failure.error_file).name
            try:
                return is_user_error(json.loads(sibling.read_text()).get("message"))
            except (OSError, ValueError, AttributeError):
                return False
    return False


if __name__ == "__main__":
    sys.exit(main())

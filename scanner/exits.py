"""One exit-status rule for every command (`fbmem ...`, `jobs/full_scan.py`, `jobs/mitigate.py`),
so scripts and schedulers can tell the outcomes apart:

    0  everything was processed
    3  finished, but some inputs could not be processed: they are error rows (the scan's
       `errors` table, a `compare` record's "error"), the rest of the results are complete
    1  aborted: the command stopped before finishing (I/O failure, interrupt, a crash)
    2  usage error: bad arguments or inputs, refused before or instead of any work
"""

from __future__ import annotations

import sys
from collections.abc import Callable

OK, ABORTED, USAGE, ERROR_ROWS = 0, 1, 2, 3

# A path that does not exist or is of the wrong kind is the user's to fix: a usage error.
BAD_PATH = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def finished(error_rows: int) -> int:
    """The status of a command that ran to its end with `error_rows` inputs not processed."""
    return ERROR_ROWS if error_rows else OK


def run(prog: str, main: Callable[..., int], *args) -> int:
    """`main(*args)`, with what escapes it turned into the rule's status and one line on
    stderr (no traceback): bad input 2, an I/O failure or an interrupt 1. Anything else is a
    bug and keeps its traceback (Python exits with 1: aborted)."""
    try:
        return main(*args)
    except (ValueError, ImportError, *BAD_PATH) as exc:  # bad inputs, a missing extra
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE
    except OSError as exc:  # disk full, read-only output, lost mount
        print(f"{prog}: aborted: {exc}", file=sys.stderr)
        return ABORTED
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; finished shards are kept: the same command resumes a scan "
            "or a reference build",
            file=sys.stderr,
        )
        return ABORTED

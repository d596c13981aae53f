"""The form of every mistake a user can make: one line `<command>: error: <what to change>`.

No traceback and exit status 2, as argparse ends a bad command line.
"""

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn


def fail(message: str, prog: str = "vitexp", code: int = 2) -> NoReturn:
    """Prints `<prog>: error: <message>` to stderr and exits with `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def failing_on(*errors: type[Exception], prog: str = "vitexp") -> Iterator[None]:
    """Ends the command in one line (`fail`) when one of `errors` leaves the block."""
    try:
        yield
    except errors as err:
        fail(str(err), prog)

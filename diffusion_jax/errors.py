"""The user-error base class and the one way the command lines report one.

Every error a user can cause and fix (a bad config, a missing dataset or checkpoint, a refused
batch size, ...) derives from `UserError`. The command lines (`main`, `convert`,
`evaluation.convert_inception`) catch `UserError` and end with one `error:` line on stderr and
exit status 2 instead of a traceback; anything else is a bug and keeps its traceback.
"""

import sys
from typing import NoReturn

USAGE_ERROR = 2  # the exit status of every refusal


class UserError(Exception):
    """An error in what the user asked for; its message says what is wrong and how to fix it."""


class DatasetError(UserError, ValueError):
    """A data problem the user can fix; the message names the dataset and the fix."""


class ConversionError(UserError, ValueError):
    """Input weights that cannot be converted (missing file, unknown layout, wrong shape)."""


def fail(message: str, *, one_line: bool = False) -> NoReturn:
    """Writes `error: <message>` on stderr and exits with `USAGE_ERROR`.

    A config error lists one problem per line; `one_line` folds any other message onto one.
    """
    text = ' '.join(str(message).split()) if one_line else str(message).rstrip()
    sys.stderr.write(f'error: {text}\n')
    sys.exit(USAGE_ERROR)

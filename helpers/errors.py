"""The project's error and warning types.

Problems with the user's input raise :class:`InputError` where they are found; the CLI turns
it into one line on stderr and exit status 2 in exactly one place (``cli.main``).
"""

from __future__ import annotations

import warnings


class InputError(Exception):
    """Bad input (a file, a setting): the message is one line naming the file and the problem."""


class PipelineWarning(UserWarning):
    """Something the user should know about a result (recorded in results.json too)."""


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its first non-empty line, or its type's name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def warn(message: str) -> None:
    """Emit a :class:`PipelineWarning`; ``pipeline.run`` records every one in the provenance."""
    warnings.warn(message, PipelineWarning, stacklevel=2)

"""The one exception type sparsecore raises for bad input."""


class SparseCoreError(ValueError, TypeError):
    """Bad argument: the message names the argument, what was expected and what came.

    Subclasses both ValueError and TypeError so callers may catch either (a wrong dtype is a
    TypeError in spirit, a wrong shape a ValueError); catch ``SparseCoreError`` to be exact.
    """


def fail(arg, expected, got):
    """Raise SparseCoreError(`arg`: expected ..., got ...). Hot paths test first and call this,
    so the message is only formatted for bad input."""
    raise SparseCoreError(f"{arg}: expected {expected}, got {got}")


def check(cond, arg, expected, got):
    """Raise SparseCoreError(`arg`: expected ..., got ...) unless `cond`."""
    if not cond:
        fail(arg, expected, got)

"""The exceptions that mean "the input is wrong", not "the code is wrong".

Library code raises a ``UserError`` (or a subclass) for a bad input, with a message that names the input and the
fix; the command line prints such an error as one line (``error: ...``) and exits with status 2. Any other
exception is a bug and keeps its traceback. ``UserError`` is a ``ValueError``, so callers that catch ``ValueError``
keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad input (value, file, folder, setting): the message names it and the fix."""


class InputNotFoundError(FileNotFoundError, UserError):
    """A file or folder the user named does not exist or lacks what it must hold."""


class ConfigError(UserError):
    """A recipe, flag or ``--set`` value that no run can use."""


class MissingDependencyError(ImportError, UserError):
    """An optional package the command needs is not installed; the message says what to install."""

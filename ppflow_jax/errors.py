"""The user-mistake error type that command-line entry points report as one `error:` line.

`UserError` marks a problem the user can fix (a config value, a missing or unreadable file, a
checkpoint that does not fit) and carries a message that names the field or file and says what to
do. `ppflow_jax/cli.py` prints it without a traceback and exits with status 2. Subclasses also
inherit the builtin type callers catch (`ConfigError` is a `ValueError`).
"""

from __future__ import annotations


class UserError(Exception):
  """A mistake in the user's input; the message names the field/file and what to do."""


class ConfigError(UserError, ValueError):
  """A config value no run can use (unknown field, out of range, inconsistent schedule)."""


class UserFileError(UserError, FileNotFoundError):
  """A file or directory named by the user is missing or empty."""

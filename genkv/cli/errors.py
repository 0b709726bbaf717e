"""Errors the CLI reports as one line (no traceback) with a non-zero exit."""


class CLIError(Exception):
    """A problem with the user's input: message names the problem and the fix."""

    exit_code = 2

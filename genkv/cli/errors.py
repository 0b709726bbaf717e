"""Errors the CLI reports as one line (no traceback) with a non-zero exit."""


class CLIError(Exception):
    """A problem with the user's input: message names the problem and the fix."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers and ``kill`` send), raised in the main thread so that a render stops the way
    Ctrl-C stops it (every finished chunk kept, the summary written) and exits 128 + 15."""

    exit_code = 143

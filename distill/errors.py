"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class DistillError(Exception):
    """A user-facing error. The message names the file (or flag) and the problem, in one line."""

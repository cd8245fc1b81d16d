"""User-facing errors.

Everything a user can get wrong (a bad image, a prompt that does not fit, a checkpoint that
does not match its config) raises `InputError` with one line that names the problem. The CLIs
print that line and exit non-zero; library callers can catch it as a ValueError.
"""


class InputError(ValueError):
    """Bad user input: the message is one line, meant to be shown as is."""


class CheckpointError(InputError):
    """A checkpoint or config that cannot be loaded as asked."""

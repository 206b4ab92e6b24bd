"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class AbsorberError(Exception):
    """A user-facing error: bad input, a missing package, a malformed bundle. Its message is one line."""

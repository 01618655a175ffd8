"""The one exception type a user sees: a single sentence naming the problem and the fix."""


class LensError(Exception):
    """A user-facing error; the CLI prints its message alone, without a traceback."""

"""The one exception type users see: its message says what was wrong and what to do, on one line."""


class JaxmedError(Exception):
    """A problem with the user's input (path, config, checkpoint, data), not a bug in jaxmed."""

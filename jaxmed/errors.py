"""The exception types: JaxmedError, the one users see (its message says what was wrong and what to do, on one
line), and UnreadableImage, one file that is recorded as skipped with its reason."""


class JaxmedError(Exception):
    """A problem with the user's input (path, config, checkpoint, data), not a bug in jaxmed."""


class UnreadableImage(Exception):
    """The file or bytes could not be decoded into an image; the message says why."""

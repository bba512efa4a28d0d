"""The one exception family for user mistakes (bad config, bad data, wrong workdir). `main` prints these as a
one-line error naming the field and the fix, without a traceback; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the config, the data or the workdir; the message names the field and the fix."""

"""The one error every checkpoint reader and writer raises, in a module of its own so that all of
them (and the application's, and the scripts' error handlers) import it from below."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read; the message says what to do."""

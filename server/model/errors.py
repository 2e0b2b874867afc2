"""Errors raised while loading a base model."""


class ModelLoadError(ValueError):
    """A model folder that cannot be served: the message is one line naming the problem."""

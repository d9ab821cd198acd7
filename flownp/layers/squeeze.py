"""Squeeze (placeholder: being written)."""

from flownp.layers.base import Layer


class Squeeze(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Squeeze is not implemented yet")

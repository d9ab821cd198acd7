"""EmergingConv (placeholder: being written)."""

from flownp.layers.base import Layer


class EmergingConv(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("EmergingConv is not implemented yet")

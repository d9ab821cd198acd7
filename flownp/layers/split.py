"""Split (placeholder: being written)."""

from flownp.layers.base import Layer


class Split(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Split is not implemented yet")

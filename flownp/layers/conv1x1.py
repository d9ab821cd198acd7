"""Conv1x1 (placeholder: being written)."""

from flownp.layers.base import Layer


class Conv1x1(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Conv1x1 is not implemented yet")

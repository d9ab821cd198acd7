"""ConditionerNet (placeholder: being written)."""

from flownp.layers.base import Layer


class ConditionerNet(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("ConditionerNet is not implemented yet")

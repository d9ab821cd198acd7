"""Coupling layers (placeholder: being written)."""

from flownp.layers.base import Layer


class AffineCoupling(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("AffineCoupling is not implemented yet")


class QuadCoupling(Layer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("QuadCoupling is not implemented yet")

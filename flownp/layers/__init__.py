"""Flow layers. Every part follows one of the contracts of :mod:`flownp.layers.base`
(:class:`Layer`, :class:`FactorOut`, :class:`Network`)."""

from flownp.layers.actnorm import ActNorm
from flownp.layers.base import Layer
from flownp.layers.cinc import CInCConv
from flownp.layers.conditional import ConditionalPrior, LatentClassifier
from flownp.layers.conditioner import ConditionerNet
from flownp.layers.conv1x1 import Conv1x1
from flownp.layers.coupling import AffineCoupling, QuadCoupling
from flownp.layers.emerging import EmergingConv
from flownp.layers.split import LearnedPrior, Split
from flownp.layers.squeeze import Squeeze

__all__ = [
    "Layer",
    "ActNorm",
    "CInCConv",
    "Conv1x1",
    "EmergingConv",
    "ConditionerNet",
    "AffineCoupling",
    "QuadCoupling",
    "Squeeze",
    "Split",
    "LearnedPrior",
    "ConditionalPrior",
    "LatentClassifier",
]

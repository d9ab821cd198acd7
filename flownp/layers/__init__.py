"""Flow layers. Every part follows one of the contracts of :mod:`flownp.layers.base`
(:class:`Layer`, :class:`FactorOut`, :class:`Network`)."""

from flownp.layers.actnorm import ActNorm
from flownp.layers.base import Layer
from flownp.layers.cinc import CInCConv
from flownp.layers.conditional import ConditionalPrior, LatentClassifier
from flownp.layers.conditioner import ConditionerNet
from flownp.layers.conv1x1 import Conv1x1
from flownp.layers.coupling import AdditiveCoupling, AffineCoupling, QuadCoupling
from flownp.layers.emerging import EmergingConv
from flownp.layers.periodic import PeriodicConv
from flownp.layers.permute import ChannelPermutation
from flownp.layers.split import LearnedPrior, Split
from flownp.layers.squeeze import Squeeze

__all__ = [
    "Layer",
    "ActNorm",
    "CInCConv",
    "Conv1x1",
    "EmergingConv",
    "PeriodicConv",
    "ChannelPermutation",
    "ConditionerNet",
    "AffineCoupling",
    "AdditiveCoupling",
    "QuadCoupling",
    "Squeeze",
    "Split",
    "LearnedPrior",
    "ConditionalPrior",
    "LatentClassifier",
]

"""flownp: a NumPy + Numba reference implementation of CInC Flow.

"CInC Flow: Characterizable Invertible 3x3 Convolution" (Nagar, Dufraisse, Varma, 2021):
normalizing flows built from invertible top-left padded k x k convolutions and quad coupling,
with the Glow (1x1) and Emerging-convolution baselines.

Direction convention: ``forward`` maps data -> latent and returns ``(y, logdet)``;
``inverse`` maps latent -> data. Arrays are NHWC; kernels are ``(k, k, C_in, C_out)``.
"""

from flownp.errors import (
    CheckpointError,
    DataError,
    FlownpError,
    NonFiniteError,
    SingularKernelError,
)

__version__ = "0.1.0"

__all__ = [
    "FlownpError",
    "SingularKernelError",
    "NonFiniteError",
    "CheckpointError",
    "DataError",
    "__version__",
]

# The model and training API, imported on first use (keeps ``import flownp`` and the CLI light).
_LAZY = {
    "FlowConfig": "flownp.model",
    "FlowModel": "flownp.model",
    "TrainConfig": "flownp.train",
    "Trainer": "flownp.train",
    "load_model": "flownp.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flownp' has no attribute {name!r}")

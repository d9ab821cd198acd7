r"""Class-conditional top prior and the linear classifier on the top latent (Glow, Kingma &
Dhariwal 2018, Section 5 "class-conditional"; openai/glow ``prior`` with ``ycond`` and the
``weight_y`` classifier).

``ConditionalPrior((H, W, C), K)``: the learned top prior of
:class:`~flownp.layers.split.LearnedPrior` (per-position ``mean``, ``logs`` of shape
``(H, W, C)``) plus a learned linear function of the one-hot label ``e_n`` (row ``y_n`` of the
K x K identity), the *label embedding* ``W_mean``, ``W_logs`` of shape ``(K, C)``, zero
initialised and broadcast over the positions::

    mean_n[i, j, c] = mean[i, j, c] + (e_n W_mean)[c] = mean[i, j, c] + W_mean[y_n, c]
    logs_n[i, j, c] = logs[i, j, c] + (e_n W_logs)[c] = logs[i, j, c] + W_logs[y_n, c]
    eps_n    = (z_n - mean_n) * exp(-logs_n)                      (standardise)
    logdet_n = -sum_{i,j,c} logs_n[i, j, c]
    log N(z_n; mean_n, exp(2 logs_n)) = log N(eps_n; 0, I) + logdet_n

    forward(z, labels)   -> (eps, logdet)
    inverse(eps, labels) -> z = eps * exp(logs_n) + mean_n
    backward(deps, dlogdet) -> dz, with the per-element gradients of the standardisation
        (:func:`~flownp.layers.split.standardize_backward`)
        dz = deps * exp(-logs_n),   S^mean = -dz,   S^logs = -deps * eps - dlogdet[n]
        d mean  = sum_n S^mean_n,            d logs = sum_n S^logs_n
        d W_mean[k, c] = sum_{n: y_n = k} sum_{i,j} S^mean[n, i, j, c]   (= E^T s^mean)
        d W_logs[k, c] = sum_{n: y_n = k} sum_{i,j} S^logs[n, i, j, c]   (= E^T s^logs)
        with E the (N, K) one-hot matrix and s = S summed over (i, j), shape (N, C).
        (Were the one-hot row a free input, its gradient would be
        d e_n = s^mean_n W_mean^T + s^logs_n W_logs^T; labels are data, so it is not used.)

``per_position=True``: the embedding has one entry per position and channel, ``W_mean``,
``W_logs`` of shape ``(K, H, W, C)`` (a mean and log-scale image of the top latent per class)::

    mean_n[i, j, c] = mean[i, j, c] + W_mean[y_n, i, j, c]
    logs_n[i, j, c] = logs[i, j, c] + W_logs[y_n, i, j, c]
    d W_mean[k] = sum_{n: y_n = k} S^mean_n,   d W_logs[k] = sum_{n: y_n = k} S^logs_n

The label embedding is zero at initialisation, so an untrained conditional prior is the
unconditional one. ``labels=None`` leaves the label term out (``mean_n = mean``,
``logs_n = logs``): the *label-free latent*, an exact bijection of its own that latent editing
uses (it needs no label). :meth:`ConditionalPrior.class_log_likelihoods` scores one top latent
under every class, ``log N(z_n; mean_k, exp(2 logs_k))`` for k = 0..K-1 (only the prior
changes; the generative classifier ``argmax_k log p(x | k)`` of a class-conditional flow).

``LatentClassifier(C, K)`` (a :class:`~flownp.layers.base.Network`): a linear classifier on
the spatial mean of the top latent ``h`` *before* the prior standardises it (the standardised
latent depends on the label itself), weights ``V (C, K)`` and bias ``b (K,)``, zero
initialised::

    m_n = (1 / (H W)) sum_{i,j} h[n, i, j, :]                     (N, C)
    a_n = m_n V + b                                               logits (N, K)
    forward(h) -> a;   backward(da) -> dh[n, i, j, :] = (da_n V^T) / (H W)
        dV = m^T da,   db = sum_n da_n

:func:`cross_entropy_bits` is its loss, the cross-entropy in bits, with its gradient::

    bits_y_n = (logsumexp_k a_n[k] - a_n[y_n]) / ln 2
    d bits_y_n / d a_n = (softmax(a_n) - e_n) / ln 2
    error_n  = [argmax_k a_n[k] != y_n]                          (the classification error)

At initialisation every logit is 0, so ``bits_y = log2 K`` for every image. A flow trained with
``--weight-y W`` minimises ``mean_n(bits_x_n + W bits_y_n)`` (openai/glow ``weight_y``); the
classifier's gradient reaches the flow through ``dh``.

Differences from openai/glow (exact reparameterisations, documented for porters): Glow's
``linear_zeros`` multiplies its output by ``exp(3 * logs)`` and has a bias; here the factor is
folded into the weights, and the prior's label term has no bias (the per-position ``mean`` /
``logs`` already are one). Glow's label embedding is one ``(K, 2C)`` matrix whose first ``C``
columns are the mean; here it is ``W_mean`` and ``W_logs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flownp.layers.base import Network
from flownp.layers.split import (
    LearnedPrior,
    standardize_backward,
    standardize_forward,
    standardize_inverse,
)

LN2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


def check_labels(labels: Any, n: int, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as int64 ``(n,)`` in ``0 .. num_classes - 1``, else a ``ValueError`` /
    ``TypeError`` naming the problem (``where`` starts the message)."""
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{where}: labels must have shape ({n},), got {arr.shape}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(
            f"{where}: label {bad} is outside the classes 0..{num_classes - 1} of this model"
        )
    return arr.astype(np.int64, copy=False)


# ---------------------------------------------------------------------- the prior
class ConditionalPrior(LearnedPrior):
    """Learned Gaussian top prior whose mean and log-scale also depend on the class label.

    Parameters
    ----------
    shape : (H, W, C)
        Shape of one top latent.
    num_classes : int
        K >= 2, the number of classes.
    per_position : bool
        False: the label embedding is one offset per channel, broadcast over the positions
        (as in Glow); True: one per position and channel.
    dtype : float32 or float64

    Parameters of the layer (all zero initialised): ``mean``, ``logs`` ``(H, W, C)`` (as in
    :class:`~flownp.layers.split.LearnedPrior`), ``label_mean``, ``label_logs`` ``(K, C)``,
    or ``(K, H, W, C)`` with ``per_position`` (the label embedding ``W_mean``, ``W_logs`` of
    the module docstring).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_classes: int,
        *,
        per_position: bool = False,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__(shape, dtype=dtype)
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, (int, np.integer))
            or num_classes < 2
        ):
            raise ValueError(
                f"ConditionalPrior: num_classes must be an int >= 2, got {num_classes!r}"
            )
        self.num_classes = int(num_classes)
        self.per_position = bool(per_position)
        K, C = self.num_classes, self.shape[2]
        emb = (K, *self.shape) if self.per_position else (K, C)
        self.add_param("label_mean", np.zeros(emb))
        self.add_param("label_logs", np.zeros(emb))

    def _labels(self, labels: Any, n: int) -> np.ndarray | None:
        if labels is None:
            return None
        return check_labels(labels, n, self.num_classes, type(self).__name__)

    def mean_logs(self, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_n, logs_n)`` of the module docstring: ``(N, H, W, C)`` each for labels
        ``(N,)``, or the label-free ``(H, W, C)`` parameters themselves for None."""
        mean, logs = self._params["mean"], self._params["logs"]
        if labels is None:
            return mean, logs
        if self.per_position:  # a (H, W, C) offset per class
            mean_n = mean + self._params["label_mean"][labels]  # (N, H, W, C)
            return mean_n, logs + self._params["label_logs"][labels]
        mean_n = mean + self._params["label_mean"][labels][:, None, None, :]  # (N, H, W, C)
        logs_n = logs + self._params["label_logs"][labels][:, None, None, :]
        return mean_n, logs_n

    def forward(self, z: np.ndarray, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        z = self._check(z, "z")
        y = self._labels(labels, z.shape[0])
        mean, logs = self.mean_logs(y)
        eps, inv_scale, logdet = standardize_forward(z, mean, logs)
        self._cache = (eps, inv_scale, y)
        return eps, logdet

    def inverse(self, eps: np.ndarray, labels: Any = None) -> np.ndarray:
        eps = self._check(eps, "eps")
        mean, logs = self.mean_logs(self._labels(labels, eps.shape[0]))
        return standardize_inverse(eps, mean, logs)

    def backward(self, deps: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        eps, inv_scale, y = self.pop_cache()
        N = eps.shape[0]
        deps = self.check_grad(deps, eps.shape, "deps")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dz, dmean, dlogs = standardize_backward(deps, dlogdet, eps, inv_scale)  # (N, H, W, C)
        self._grads["mean"] += dmean.sum(axis=0)
        self._grads["logs"] += dlogs.sum(axis=0)
        if y is not None and self.per_position:  # d W[k] = sum over the images of class k
            np.add.at(self._grads["label_mean"], y, dmean)
            np.add.at(self._grads["label_logs"], y, dlogs)
        elif y is not None:  # d W[k] = sum over the images of class k and the positions
            np.add.at(self._grads["label_mean"], y, dmean.sum(axis=(1, 2)))
            np.add.at(self._grads["label_logs"], y, dlogs.sum(axis=(1, 2)))
        return dz

    def class_log_likelihoods(self, z: np.ndarray) -> np.ndarray:
        """``L[n, k] = log N(z_n; mean_k, exp(2 logs_k))`` summed over the top latent, for
        every class k (float64 ``(N, K)``). One top latent ``z``, scored under each class: only
        the prior changes. Adding the flow's log-det and the split latents' log-density gives
        ``log p(x | y = k)``."""
        z = self._check(z, "z")
        N = z.shape[0]
        D = int(np.prod(self.shape))
        out = np.empty((N, self.num_classes), dtype=np.float64)
        for k in range(self.num_classes):
            mean, logs = self.mean_logs(np.full(N, k, dtype=np.int64))
            eps, _, logdet = standardize_forward(z, mean, logs)
            e = eps.reshape(N, -1).astype(np.float64)
            out[:, k] = -0.5 * np.einsum("nd,nd->n", e, e) - 0.5 * D * LOG_2PI + logdet
        return out


# ---------------------------------------------------------------------- the classifier
class LatentClassifier(Network):
    """Linear classifier on the spatial mean of the top latent (module docstring).

    Parameters
    ----------
    channels : int
        C, the channels of the top latent.
    num_classes : int
        K >= 2.
    dtype : float32 or float64

    Parameters ``weight (C, K)`` and ``bias (K,)``, zero initialised.
    """

    def __init__(self, channels: int, num_classes: int, *, dtype: Any = np.float64) -> None:
        super().__init__(dtype)
        for name, val, lo in (("channels", channels, 1), ("num_classes", num_classes, 2)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ValueError(f"LatentClassifier: {name} must be an int >= {lo}, got {val!r}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.add_param("weight", np.zeros((self.channels, self.num_classes)))
        self.add_param("bias", np.zeros(self.num_classes))

    def forward(self, h: np.ndarray) -> np.ndarray:
        h = self.check_input(h, self.channels, name="h")
        N, H, W, _ = h.shape
        m = h.mean(axis=(1, 2))  # (N, C)
        self._cache = (m, (H, W))
        return m @ self._params["weight"] + self._params["bias"]  # (N, K)

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        m, (H, W) = self.pop_cache()
        N = m.shape[0]
        da = self.check_grad(dlogits, (N, self.num_classes), "dlogits")
        self._grads["weight"] += m.T @ da
        self._grads["bias"] += da.sum(axis=0)
        dm = (da @ self._params["weight"].T) / self.dtype.type(H * W)  # (N, C)
        return np.ascontiguousarray(np.broadcast_to(dm[:, None, None, :], (N, H, W, self.channels)))


def cross_entropy_bits(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-entropy in bits of ``logits (N, K)`` against integer ``labels (N,)``.

    Returns ``(bits, dbits, error)``: ``bits (N,)`` float64, ``dbits (N, K)`` the gradient of
    each ``bits[n]`` with respect to its own row ``logits[n]`` (``(softmax - one_hot) / ln 2``,
    float64) and ``error (N,)`` float64, 1.0 where ``argmax logits[n] != labels[n]`` (module
    docstring).
    """
    a = np.asarray(logits, dtype=np.float64)
    N, K = a.shape
    y = check_labels(labels, N, K, "cross_entropy_bits")
    top = a.max(axis=1, keepdims=True)
    ex = np.exp(a - top)
    total = ex.sum(axis=1, keepdims=True)
    lse = (top + np.log(total))[:, 0]  # (N,)
    rows = np.arange(N)
    bits = (lse - a[rows, y]) / LN2
    dbits = ex / total
    dbits[rows, y] -= 1.0
    dbits /= LN2
    error = (np.argmax(a, axis=1) != y).astype(np.float64)
    return bits, dbits, error

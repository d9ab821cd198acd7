"""Explicit-matrix verification of the CInC Flow paper (``python -m verification``).

* :mod:`verification.dense`: dense matrices of padded convolutions, built entry by entry from
  the paper's Definitions 1-3 (independent of :mod:`flownp.kernels`), and exact determinants.
* :mod:`verification.claims`: the executable claims of Section 3.1 (each returns a
  :class:`~verification.result.ClaimResult`), and the layer registry ``LAYER_FACTORIES``.
* :mod:`verification.figures`: Figure 1 reproduced.
* :mod:`verification.stability`: the numerical stability of the inverse.
* :mod:`verification.fixed_kernel`: ``FixedKernelCInC``, a CInC layer with a given kernel
  (counterexamples, singular kernels, stability measurements on prescribed kernels).
* :mod:`verification.official_bug`: the public code's quad-coupling reverse, reproduced (not an
  inverse; claim ``quad_official_reverse_bug``).
* :mod:`verification.reference`: reference vectors for ports (``flownp export-reference``,
  ``flownp check-reference``).
* ``python -m verification [--quick] [--out DIR]`` / ``flownp verify``: the report.
"""

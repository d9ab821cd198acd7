r"""Executable claims of the paper, checked with explicit matrices, one module per report
section: :mod:`verification.claims.cinc`, :mod:`verification.claims.layers` and
:mod:`verification.claims.beyond` (each with a ``run(out_dir, quick, verbose)``).

Every claim is a function returning a :class:`ClaimResult` (re-exported from
:mod:`verification.result`) and printing what it checked with the numbers. The matrices come
from :mod:`verification.dense`, which builds them entry by entry from the paper's Definitions
1-3 and shares no code with the kernels under test.

Section ``cinc`` (paper Section 3.1, :func:`run_claims`):

=================================  ==============================================================
:func:`claim_lemma1`               top-left padding: M lower triangular (masked corner) / block
                                   lower triangular (full corner), every diagonal (block) = corner
:func:`claim_theorem1`             C = 1: det M = K[k-1,k-1]^(HW) exactly (integer kernels), hence
                                   invertible iff K[k-1,k-1] != 0
:func:`claim_general_c`            C > 1: det M = det(A)^(HW) exactly (full corner), =
                                   prod(d)^(HW) (masked corner)
:func:`claim_symmetric`            symmetric ("same") padding: singular matrices with a nonzero
                                   corner (and centre), found and printed with an exact certificate
:func:`claim_layer_dense`          CInCConv's forward / logdet / three inverses against M x,
                                   slogdet(M) and the dense solve
:func:`claim_figure1`              Figure 1 reproduced (PNG) with its structural numbers
=================================  ==============================================================

Section ``layers`` (every layer and the whole model, :func:`run_layer_claims`):

=================================  ==============================================================
:func:`claim_layer_jacobians`      every registered layer (:data:`LAYER_FACTORIES`): logdet =
                                   slogdet of its finite-difference Jacobian, and the round trip
:func:`claim_layer_gradients`      every layer's backward against central differences (input and
                                   every parameter), the conditioner network included
:func:`claim_quad_structure`       the quad coupling's Jacobian is block lower triangular (figure)
:func:`claim_models`               the whole FlowModel for every conv kind x coupling: logdet,
                                   round trip, gradients (figure: the model's Jacobian)
=================================  ==============================================================

Section ``beyond`` (what the paper states without proof / the public code gets wrong,
:func:`run_beyond_claims`):

=================================  ==============================================================
:func:`claim_wavefront`            the inverse needs exactly H + W - 1 sequential pixel steps
                                   (depth of the dependency DAG of the dense matrix)
:func:`claim_quad_official_bug`    REPRODUCTION of the official quad-coupling reverse bug: not an
                                   inverse; flownp's inverse is
:func:`claim_periodic`             the periodic convolution against its dense circulant matrix;
                                   singular free kernels refused; the guard's bound
=================================  ==============================================================

``python -m verification`` writes the report.
"""

from verification.claims._common import describe
from verification.claims.beyond import (
    claim_periodic,
    claim_quad_official_bug,
    claim_wavefront,
    dependency_levels,
)
from verification.claims.beyond import run as run_beyond_claims
from verification.claims.cinc import (
    claim_figure1,
    claim_general_c,
    claim_layer_dense,
    claim_lemma1,
    claim_symmetric,
    claim_theorem1,
)
from verification.claims.cinc import run as run_claims
from verification.claims.layers import (
    GRADIENT_ONLY_FACTORIES,
    LAYER_FACTORIES,
    claim_layer_gradients,
    claim_layer_jacobians,
    claim_models,
    claim_quad_structure,
    model_jacobian,
    tiny_model,
)
from verification.claims.layers import run as run_layer_claims
from verification.result import ClaimResult

__all__ = [
    "ClaimResult",
    "LAYER_FACTORIES",
    "GRADIENT_ONLY_FACTORIES",
    "claim_lemma1",
    "claim_theorem1",
    "claim_general_c",
    "claim_symmetric",
    "claim_layer_dense",
    "claim_figure1",
    "claim_layer_jacobians",
    "claim_layer_gradients",
    "claim_quad_structure",
    "claim_models",
    "claim_wavefront",
    "claim_quad_official_bug",
    "claim_periodic",
    "dependency_levels",
    "model_jacobian",
    "tiny_model",
    "run_claims",
    "run_layer_claims",
    "run_beyond_claims",
    "describe",
]

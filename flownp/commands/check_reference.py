"""Compare a port's tensors with the reference vectors (docs/reference-vectors.md).

PORT.h5 has the layout of the reference file: one group per model (``cinc_quad``,
``cinc_default``, ...) holding the tensors the port computed under the same paths
(``forward/level0/step0/conv/output``, ``latent/z``, ``grads/params/...``, ...). Every computed
tensor of the reference is compared (the weights and inputs are not); one line per tensor, in
computation order (the layers in forward order, then latent, loss, gradients, inverse, sample,
Adam): name, max |port - reference|, the tolerance, OK / NOT OK; a failing check ends by
naming the first mismatch. A tensor is OK when
``max|diff| <= atol + rtol * max|reference|``. Exit status 1 if any tensor is NOT OK or
missing (--allow-missing: missing ones are skipped, for a port that is not finished; a file
holding none of the reference's tensors is refused, exit status 2, as is a --reference that is
not a reference file).

Suggested tolerances: the defaults for a float64 port; --rtol 1e-4 --atol 1e-5 as a starting
point for a float32 port (flownp's own float32 replay: docs/reference-vectors.md).
"""

from __future__ import annotations

import argparse

from flownp.commands._common import nonnegative_float

HELP = "compare a port's tensors with the reference vectors (one line per tensor)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verification import reference as R

    parser.add_argument("port", help="the port's HDF5 file (same paths as the reference)")
    parser.add_argument(
        "--reference",
        default=str(R.DEFAULT_PATH),
        metavar="REF.h5",
        help="reference file (default: the committed verification/data/reference_vectors.h5)",
    )
    parser.add_argument("--rtol", type=nonnegative_float, default=R.RTOL, help="relative tolerance")
    parser.add_argument("--atol", type=nonnegative_float, default=R.ATOL, help="absolute tolerance")
    parser.add_argument(
        "--allow-missing", action="store_true", help="skip tensors the port does not provide"
    )


def run(args: argparse.Namespace) -> int:
    from verification import reference as R

    return R.check_reference(
        args.port, args.reference, args.rtol, args.atol, allow_missing=args.allow_missing
    )

"""Write the reference vectors for ports (docs/reference-vectors.md): twelve small fixed
float64 models (the paper's layers without guard: CInC + quad coupling, 1x1 LU + Emerging +
affine coupling; the default configuration: LU corner, guard 0.9, exp scale, mixed sign
buffers; the unit corner, a plain 1x1 convolution and Emerging alone; the periodic
convolution with and without guard, channel reversal and shuffle, 1x1 + CInC, the additive
coupling; a class-conditional model with the latent classifier on 5-bit data), their weights,
an input batch (and labels), every layer's output and log-det, the latent, the
bits/dim loss, every parameter gradient, two inverses and the weights after 3 Adam (or
Adamax) steps, in one HDF5 file.

With --replay REF.h5 the vectors are recomputed from the configurations, weights and inputs
*stored in REF.h5* (a fresh model with another seed, the file's parameters loaded),
optionally in float32: this is what a port does, and the output is a port file for
``flownp check-reference``. An edited REF.h5 (another guard in a group's config, other
weights) gives the reference of that edited model (docs/reference-vectors.md, "--replay").
An existing output file is refused unless --overwrite.

Examples:
  # regenerate the committed file
  flownp export-reference verification/data/reference_vectors.h5 --overwrite
  flownp export-reference port32.h5 --replay verification/data/reference_vectors.h5 --dtype float32
"""

from __future__ import annotations

import argparse
import os

from flownp.commands._common import add_overwrite
from flownp.errors import UsageError

HELP = "write the reference vectors (weights, inputs, every intermediate) for ports"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output HDF5 file (.h5 or .hdf5)")
    parser.add_argument(
        "--replay",
        metavar="REF.h5",
        help="recompute from the weights and inputs stored in this reference file",
    )
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of the replay (--replay only)",
    )
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from flownp.files import refuse_existing
    from verification import reference as R

    out = refuse_existing(args.out, args.overwrite, suffixes=(".h5", ".hdf5"))
    if args.replay:
        vectors = R.replay(args.replay, args.dtype)
        configs = R.read_configs(args.replay)  # an edited configuration is kept as it is
    else:
        if args.dtype != "float64":
            raise UsageError("--dtype needs --replay (the reference is float64)")
        vectors = R.generate()
        configs = None
    path = R.write(out, vectors, configs)
    n = sum(len(v) for v in vectors.values())
    size = os.path.getsize(path)
    print(f"wrote {path}: {len(vectors)} models, {n} tensors, {size / 1024:.0f} KiB")
    return 0

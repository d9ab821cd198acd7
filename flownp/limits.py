"""Sizes checked before memory is allocated.

A file header (IDX dimensions, an ``.npy`` header, an HDF5 dataset's shape, a PNG's width and
height, a tar member's size) or an option (``sample -n``) can ask for more memory than the
machine has. :func:`check_allocation` compares the bytes asked for with the memory available
now and raises a one-line error naming what asked, instead of a ``MemoryError`` traceback
(or a machine that swaps) half-way through the work.
"""

from __future__ import annotations

import os

from flownp.errors import DataError, FlownpError

__all__ = ["available_memory", "check_allocation", "format_bytes"]


def available_memory() -> int:
    """Bytes of memory a new allocation can use now: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the physical memory (``os.sysconf``), else 2**63 (unknown: no limit)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 2**63


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_allocation(
    nbytes: int | float, what: str, error: type[FlownpError] = DataError, hint: str = ""
) -> None:
    """Raise ``error`` when ``nbytes`` is more than the memory available now.

    ``what`` names who asks (``"data.h5['train']: 100000000 images of (28, 28, 1) uint8"``);
    ``hint`` is appended to the message (how to ask for less).
    """
    avail = available_memory()
    if nbytes > avail:
        raise error(
            f"{what} would need {format_bytes(nbytes)} of memory, more than the "
            f"{format_bytes(avail)} available{'; ' + hint if hint else ''}"
        )

"""Labelled images for attribute directions: MNIST attributes measured from the pixels
(stroke thickness, slant, ink), class labels as one-hot attributes, and CelebA's attribute file
with its image folder.

The result is a :class:`LabelledImages` (uint8 images with named float attributes), the input of
:func:`flownp.latent.attribute_directions` (paper Section 4, Figure 5).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flownp.errors import DataError

MNIST_ATTRIBUTES = ("thickness", "slant", "ink")

# --------------------------------------------------------------------------- MNIST attributes


def _ink(images: np.ndarray) -> np.ndarray:
    """Images -> ink in [0, 1], (N, H, W) float64: uint8 / 255 (floats are taken as ink
    already); channels averaged."""
    x = np.asarray(images)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float64) * scale
    if x.ndim == 4:
        x = x.mean(axis=3)
    if x.ndim != 3:
        raise ValueError(f"MNIST attributes: images must be (N, H, W[, C]), got {x.shape}")
    return x


def ink_mass(images: np.ndarray) -> np.ndarray:
    """Mean ink per pixel, in [0, 1]: ``sum I / (H W)`` with ``I = u / 255``. (N,)"""
    I = _ink(images)
    return I.mean(axis=(1, 2))


def stroke_thickness(images: np.ndarray) -> np.ndarray:
    """Stroke width in pixels, from ink area and ink perimeter (no skeleton needed). (N,)

    ``A = sum I`` (ink area) and ``P = sum |grad I|`` (total variation = perimeter of the ink,
    unchanged by anti-aliasing blur; gradient on the pixel-corner grid, image zero-padded).
    The width ``w`` is that of the ``w x L`` rectangle with the same area and perimeter,
    ``w L = A``, ``2 (w + L) = P``::

        w = (P/2 - sqrt(max(P^2/4 - 4 A, 0))) / 2

    It measures width, not length: a long and a short stroke of equal width get nearly the same
    value (unlike total ink), and a ring of width ``w`` gets about ``w``. Blank images give 0.
    """
    I = np.pad(_ink(images), ((0, 0), (1, 1), (1, 1)))  # (N, H+2, W+2)
    gx = 0.5 * ((I[:, :-1, 1:] - I[:, :-1, :-1]) + (I[:, 1:, 1:] - I[:, 1:, :-1]))  # (N, H+1, W+1)
    gy = 0.5 * ((I[:, 1:, :-1] - I[:, :-1, :-1]) + (I[:, 1:, 1:] - I[:, :-1, 1:]))
    half_p = 0.5 * np.sqrt(gx * gx + gy * gy).sum(axis=(1, 2))  # (N,)  = w + L
    area = I.sum(axis=(1, 2))  # (N,)  = w L
    return 0.5 * (half_p - np.sqrt(np.maximum(half_p * half_p - 4.0 * area, 0.0)))


def slant(images: np.ndarray) -> np.ndarray:
    """Slant from second image moments: horizontal shift per unit height. (N,)

    With ink weights ``I``, ``x`` = column and ``y`` = -row (upwards), centred on the ink
    centroid: ``slant = sum I x y / sum I y^2``, the shear ``x -> x - slant * y`` that removes
    the correlation (as in moment deskewing). Positive = leaning right (``/``), 0 = upright,
    negative = leaning left (``\\``). Blank images give 0.
    """
    I = _ink(images)  # (N, H, W)
    N, H, W = I.shape
    rows = np.arange(H, dtype=np.float64)[None, :, None]
    cols = np.arange(W, dtype=np.float64)[None, None, :]
    m = I.sum(axis=(1, 2))  # (N,)
    safe = np.where(m > 0, m, 1.0)
    ri = (I * rows).sum(axis=(1, 2)) / safe  # (N,) centroid row
    cj = (I * cols).sum(axis=(1, 2)) / safe
    dr = rows - ri[:, None, None]  # (N, H, 1)
    dc = cols - cj[:, None, None]  # (N, 1, W)
    mu_rc = (I * dr * dc).sum(axis=(1, 2))
    mu_rr = (I * dr * dr).sum(axis=(1, 2))
    return np.where(mu_rr > 0, -mu_rc / np.where(mu_rr > 0, mu_rr, 1.0), 0.0)


def one_hot(labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """Integer labels (N,) -> float64 one-hot (N, n_classes); out-of-range labels -> DataError."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"one_hot: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"one_hot: label {int(y[i])} at index {i} is outside [0, {n_classes})")
    out = np.zeros((len(y), n_classes))
    out[np.arange(len(y)), y] = 1.0
    return out


def standardize(values: np.ndarray) -> np.ndarray:
    """``(v - mean) / std`` per column (float64); constant columns -> DataError."""
    v = np.asarray(values, dtype=np.float64)
    sd = v.std(axis=0)
    if np.any(sd == 0):
        raise DataError("standardize: an attribute is constant over the images")
    return (v - v.mean(axis=0)) / sd


# --------------------------------------------------------------------------- labelled data


@dataclass(frozen=True)
class LabelledImages:
    """Images with named attributes, the input of the direction computation.

    ``images`` uint8 (N, H, W, C); ``attributes`` float64 (N, K), column k named
    ``attribute_names[k]``.
    """

    name: str
    images: np.ndarray
    attributes: np.ndarray
    attribute_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"{self.name}: images must be uint8 NHWC, got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.attributes.shape != (len(self.images), len(self.attribute_names)):
            raise DataError(
                f"{self.name}: attributes have shape {self.attributes.shape}, expected "
                f"({len(self.images)}, {len(self.attribute_names)})"
            )

    def attribute(self, name: str) -> np.ndarray:
        """One attribute column (N,); an unknown name -> KeyError listing the known ones."""
        if name not in self.attribute_names:
            raise KeyError(
                f"{self.name}: no attribute {name!r}; available: {', '.join(self.attribute_names)}"
            )
        return self.attributes[:, self.attribute_names.index(name)]


def mnist_labelled(
    images: np.ndarray, labels: np.ndarray | None, name: str = "mnist"
) -> LabelledImages:
    """MNIST-style images with attributes ``digit_0 .. digit_9`` (one-hot 0/1, when labels are
    given) and ``thickness``, ``slant``, ``ink`` computed from the pixels and standardised over
    these images (mean 0, std 1: a strength of 1 is one standard deviation)."""
    images = np.asarray(images)
    cols, names = [], []
    if labels is not None:
        if len(labels) != len(images):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        cols.append(one_hot(np.asarray(labels).astype(np.int64), 10))
        names += [f"digit_{d}" for d in range(10)]
    raw = np.stack([stroke_thickness(images), slant(images), ink_mass(images)], axis=1)
    cols.append(standardize(raw))
    names += list(MNIST_ATTRIBUTES)
    return LabelledImages(name, images, np.concatenate(cols, axis=1), tuple(names))


def load_labelled(spec: str = "mnist", split: str = "train") -> LabelledImages:
    """A labelled split of any :func:`flownp.data.load_dataset` data set.

    MNIST specs (``"mnist"``, ``"mnist:PATH"``) get :func:`mnist_labelled` attributes (digits
    and pixel-derived ``thickness``, ``slant``, ``ink``); other specs get their class labels as
    one-hot attributes ``class_0 .. class_{K-1}``. ``split``: "train" or "test" (for the bundled
    MNIST the first 9000 / the last 1000 images).
    """
    from flownp.data import load_dataset

    if split not in ("train", "test"):
        raise ValueError(f"load_labelled: split must be 'train' or 'test', got {split!r}")
    ds = load_dataset(spec)
    images = ds.train if split == "train" else ds.test
    labels = ds.train_labels if split == "train" else ds.test_labels
    name = f"{spec}[{split}]"
    if spec.split(":", 1)[0] == "mnist":
        return mnist_labelled(images, labels, name=name)
    if labels is None:
        raise DataError(f"{spec}: the {split} split has no labels to compute directions from")
    all_labels = [y for y in (ds.train_labels, ds.test_labels) if y is not None]
    K = int(max(int(np.max(y)) for y in all_labels if len(y))) + 1
    attrs = one_hot(np.asarray(labels).astype(np.int64), K)
    return LabelledImages(name, images, attrs, tuple(f"class_{k}" for k in range(K)))


@dataclass(frozen=True)
class AttributeTable:
    """A parsed ``list_attr_celeba.txt``: ``values`` int8 (N, K) of +1 / -1."""

    path: str
    filenames: tuple[str, ...]
    names: tuple[str, ...]
    values: np.ndarray


def read_celeba_attributes(path: str | os.PathLike) -> AttributeTable:
    """Parse CelebA's attribute file (``list_attr_celeba.txt``).

    Format: line 1 the number of images; line 2 the K attribute names (whitespace separated);
    then one line per image, ``filename v_1 ... v_K`` with each ``v`` in ``1`` / ``+1`` / ``-1``.
    Blank lines after line 2 are ignored. Any deviation (missing file, bad count, no or repeated
    names, a row with the wrong number of values, a value other than +-1, a repeated file name,
    a row count different from line 1) raises :class:`DataError` naming the file and the line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: attribute file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read the attribute file as UTF-8 text ({exc})") from exc
    all_lines = text.splitlines()
    if len(all_lines) < 2:
        raise DataError(f"{p}: expected a count line and an attribute-name line, file is too short")
    first = all_lines[0].split()
    if len(first) != 1 or not first[0].isdigit():
        raise DataError(f"{p}, line 1: expected the number of images, got {all_lines[0]!r}")
    count = int(first[0])
    names = all_lines[1].split()
    if not names:
        raise DataError(f"{p}, line 2: expected the attribute names, the line is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{p}, line 2: repeated attribute name(s) {dup}")
    K = len(names)
    rows = [(i + 3, f) for i, f in enumerate(ln.split() for ln in all_lines[2:]) if f]
    for ln, fields in rows:
        if len(fields) != K + 1:
            raise DataError(
                f"{p}, line {ln}: expected a file name and {K} values, got {len(fields) - 1} "
                f"value(s)"
            )
    if len(rows) != count:
        raise DataError(f"{p}: line 1 declares {count} images but the file lists {len(rows)}")
    if not rows:
        return AttributeTable(str(p), (), tuple(names), np.zeros((0, K), dtype=np.int8))
    tokens = np.array([f[1:] for _, f in rows])  # (N, K) str
    values = np.where(
        (tokens == "1") | (tokens == "+1"), 1, np.where(tokens == "-1", -1, 0)
    ).astype(np.int8)
    if (values == 0).any():
        r, k = np.argwhere(values == 0)[0]
        raise DataError(
            f"{p}, line {rows[r][0]}: attribute {names[k]!r} has value {str(tokens[r, k])!r}, "
            "expected 1 or -1"
        )
    filenames = [f[0] for _, f in rows]
    if len(set(filenames)) != len(filenames):
        seen: dict[str, int] = {}
        for ln, f in rows:
            if f[0] in seen:
                raise DataError(
                    f"{p}, line {ln}: file name {f[0]!r} already listed on line {seen[f[0]]}"
                )
            seen[f[0]] = ln
    return AttributeTable(str(p), tuple(filenames), tuple(names), values)


def load_image_folder(
    folder: str | os.PathLike,
    filenames: Sequence[str],
    *,
    size: tuple[int, int],
    channels: int = 3,
    crop: int | tuple[int, int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Load named images from a folder as uint8 ``(N, H, W, C)``, ``size = (H, W)``.

    Each image is converted to RGB (C = 3) or grey (C = 1), cropped to a centred box and
    resized with Lanczos filtering. ``crop`` = (height, width) of the box (an int: a square);
    None: the largest centred box with the aspect ratio of ``size`` (for CelebA's 178 x 218
    aligned faces and a square model: the centred 178 x 178 square). A missing or unreadable
    image raises :class:`DataError` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    H, W = (int(s) for s in size)
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 or 3, got {channels}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    out = np.empty((len(filenames), H, W, channels), dtype=np.uint8)
    from flownp.progress import Progress

    bar = Progress(len(filenames), desc="images", unit="image", enabled=progress, lines=10)
    for i, name in enumerate(filenames):
        bar.update(1)
        fp = folder / name
        if not fp.is_file():
            raise DataError(f"{fp}: image not found (listed in the attribute file)")
        try:
            with Image.open(fp) as img:
                img = img.convert("RGB" if channels == 3 else "L")
                w0, h0 = img.size
                if crop is None:
                    scale = min(w0 / W, h0 / H)
                    ch, cw = round(H * scale), round(W * scale)
                else:
                    ch, cw = (crop, crop) if isinstance(crop, (int, np.integer)) else crop
                if ch > h0 or cw > w0:
                    raise DataError(f"{fp}: crop {ch}x{cw} larger than the image {h0}x{w0}")
                top, left = (h0 - ch) // 2, (w0 - cw) // 2
                img = img.crop((left, top, left + cw, top + ch))
                if img.size != (W, H):
                    img = img.resize((W, H), Image.Resampling.LANCZOS)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{fp}: not a readable image ({exc})") from exc
        out[i] = arr.reshape(H, W, channels)
    bar.close()
    return out


def load_celeba(
    attr_file: str | os.PathLike | AttributeTable,
    image_dir: str | os.PathLike,
    *,
    image_shape: tuple[int, int, int],
    start: int = 0,
    limit: int | None = None,
    crop: int | tuple[int, int] | None = None,
    progress: bool = False,
) -> LabelledImages:
    """CelebA (or any data set in its attribute format): rows ``start .. start + limit`` of the
    attribute file, images from ``image_dir`` shaped to ``image_shape = (H, W, C)``, attributes
    as float +-1 with the file's names. ``attr_file`` may be an already parsed table."""
    table = (
        attr_file if isinstance(attr_file, AttributeTable) else read_celeba_attributes(attr_file)
    )
    stop = len(table.filenames) if limit is None else min(len(table.filenames), start + limit)
    if not 0 <= start < stop:
        raise DataError(
            f"{table.path}: no rows selected (start {start}, limit {limit}, "
            f"{len(table.filenames)} rows)"
        )
    H, W, C = image_shape
    images = load_image_folder(
        image_dir,
        table.filenames[start:stop],
        size=(H, W),
        channels=C,
        crop=crop,
        progress=progress,
    )
    return LabelledImages(
        f"celeba[{start}:{stop}]", images, table.values[start:stop].astype(np.float64), table.names
    )

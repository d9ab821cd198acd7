r"""The declaration of a grid of training runs (:class:`GridConfig`) and its runs
(:class:`RunSpec`).

The grid::

    budget   in budgets                      "steps": every run trains `steps` steps
                                             "seconds": every run trains `seconds` s of wall time
    conv     in convs       (1x1, 1x1+emerging, cinc: Glow, Emerging as in the paper, CInC;
                             any of flownp.model.CONVS, e.g. periodic, 1x1+cinc, shuffle)
    coupling in couplings   (affine, quad; or additive)
    depth    in depths      (4, 8)           steps per level D
    seed     in 0 .. seeds[depth] - 1        the same seeds for every variant (paired)

Every run is one :class:`flownp.train.Trainer` with ``FlowConfig(conv, coupling, depth, **model)``
and ``TrainConfig(seed, **train)`` (:meth:`GridConfig.configs`), in its own run folder
``<out>/runs/<budget><value>/<conv>-<coupling>-d<depth>/seed<k>/`` (:meth:`RunSpec.folder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flownp.errors import FlownpError, UsageError
from flownp.model import CONVS, COUPLINGS, SAMPLE_TEMPERATURE, FlowConfig
from flownp.train import TrainConfig

BUDGETS = ("steps", "seconds")


class ExperimentError(FlownpError, ValueError):
    """A grid declaration is invalid or a run folder does not match it."""


# ---------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class GridConfig:
    """A declared grid of training runs.

    Parameters
    ----------
    convs, couplings : tuple of str
        Invertible convolutions (:data:`flownp.model.CONVS`) and couplings.
    depths : tuple of int
        Steps per level D.
    seeds : tuple of (depth, count) pairs
        Seeds ``0 .. count - 1`` for each depth (every depth of ``depths`` listed once).
    budgets : tuple of str
        ``"steps"`` and/or ``"seconds"``.
    steps : int
        Training steps of each run of the ``"steps"`` budget.
    seconds : float
        Training wall time of each run of the ``"seconds"`` budget.
    max_steps : int
        Step cap of the ``"seconds"`` budget (a run stops at whichever comes first).
    model : dict
        Other :class:`~flownp.model.FlowConfig` fields (levels, width, ...), the same for all.
    train : dict
        Other :class:`~flownp.train.TrainConfig` fields (dataset, batch_size, lr, ...), the
        same for all (``steps``, ``seed`` and ``time_limit`` are set per run).
    sample_images : int
        Images of the sampling-time measurement.
    temperature : float
        Latent temperature of those samples.
    """

    convs: tuple[str, ...] = ("1x1", "1x1+emerging", "cinc")
    couplings: tuple[str, ...] = ("affine", "quad")
    depths: tuple[int, ...] = (4, 8)
    seeds: tuple[tuple[int, int], ...] = ((4, 3), (8, 3))
    budgets: tuple[str, ...] = BUDGETS
    steps: int = 2000
    seconds: float = 300.0
    max_steps: int = 1_000_000
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    sample_images: int = 100
    temperature: float = SAMPLE_TEMPERATURE

    def __post_init__(self) -> None:
        for name, allowed in (("convs", CONVS), ("couplings", COUPLINGS), ("budgets", BUDGETS)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ExperimentError(
                    f"GridConfig: {name} must be distinct values from {', '.join(allowed)}, "
                    f"got {list(values)}"
                )
        depths = tuple(int(d) for d in self.depths)
        if not depths or min(depths) < 1 or len(set(depths)) != len(depths):
            raise ExperimentError(f"GridConfig: depths must be distinct ints >= 1, got {depths}")
        object.__setattr__(self, "depths", depths)
        seeds = tuple((int(d), int(n)) for d, n in self.seeds)
        object.__setattr__(self, "seeds", seeds)
        per = dict(seeds)
        if sorted(per) != sorted(depths) or len(per) != len(seeds):
            raise ExperimentError(
                f"GridConfig: seeds must give one count per depth {list(depths)}, got {dict(seeds)}"
            )
        if min(per.values()) < 1:
            raise ExperimentError(f"GridConfig: seed counts must be >= 1, got {dict(seeds)}")
        if int(self.steps) < 1 or int(self.max_steps) < 1:
            raise ExperimentError(
                f"GridConfig: steps and max_steps must be >= 1, got {self.steps}, {self.max_steps}"
            )
        if not float(self.seconds) > 0:
            raise ExperimentError(f"GridConfig: seconds must be > 0, got {self.seconds}")
        if int(self.sample_images) < 1 or not float(self.temperature) >= 0:
            raise ExperimentError(
                "GridConfig: sample_images must be >= 1 and temperature >= 0, got "
                f"{self.sample_images}, {self.temperature}"
            )
        for key in ("conv", "coupling", "depth", "image_shape"):
            if key in self.model:
                raise ExperimentError(f"GridConfig: model may not set {key!r} (a grid axis)")
        for key in ("steps", "seed", "time_limit"):
            if key in self.train:
                raise ExperimentError(f"GridConfig: train may not set {key!r} (set per run)")
        try:  # every field name and value checked once, before any training
            FlowConfig(conv=self.convs[0], coupling=self.couplings[0], **self.flow_model(2))
            TrainConfig(**self.train)
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"GridConfig: {exc}") from None

    def flow_model(self, num_classes: int) -> dict[str, Any]:
        """:attr:`model` as FlowConfig fields: ``class_conditional`` becomes ``num_classes``."""
        model = dict(self.model)
        if model.pop("class_conditional", False):
            model["num_classes"] = int(num_classes)
        return model

    def seed_count(self, depth: int) -> int:
        return dict(self.seeds)[depth]

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major (seed 0 of every budget and variant first, then seed 1, ...),
        so that an interrupted grid has whole comparisons rather than whole variants."""
        out = []
        for seed in range(max(n for _, n in self.seeds)):
            for budget in self.budgets:
                for depth in self.depths:
                    if seed >= self.seed_count(depth):
                        continue
                    for conv in self.convs:
                        for coupling in self.couplings:
                            out.append(RunSpec(budget, conv, coupling, depth, seed))
        return out

    def budget_value(self, budget: str) -> float:
        return float(self.steps) if budget == "steps" else float(self.seconds)

    def budget_tag(self, budget: str) -> str:
        """Folder name of a budget: ``steps2000``, ``seconds300``."""
        return f"{budget}{self.budget_value(budget):g}"

    def configs(
        self, spec: RunSpec, image_shape: Sequence[int], num_classes: int | None = None
    ) -> tuple[FlowConfig, TrainConfig]:
        """The model and training configuration of one run. ``model["class_conditional"]``
        (a class-conditional grid) takes the number of classes of the data, ``num_classes``."""
        if self.model.get("class_conditional") and not num_classes:
            raise UsageError("--class-conditional: the dataset has no labels")
        model = self.flow_model(num_classes or 0)
        mc = FlowConfig(
            image_shape=tuple(image_shape),
            conv=spec.conv,
            coupling=spec.coupling,
            depth=spec.depth,
            **model,
        )
        if spec.budget == "steps":
            tc = TrainConfig(steps=int(self.steps), seed=spec.seed, **self.train)
        else:
            tc = TrainConfig(
                steps=int(self.max_steps),
                seed=spec.seed,
                time_limit=float(self.seconds),
                **self.train,
            )
        return mc, tc

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = [list(p) for p in self.seeds]
        return d


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    budget: str
    conv: str
    coupling: str
    depth: int
    seed: int

    @property
    def variant(self) -> str:
        """``cinc-quad-d4``: the folder name of the variant (conv, coupling, depth)."""
        return f"{self.conv}-{self.coupling}-d{self.depth}"

    def folder(self, grid: GridConfig) -> Path:
        return Path("runs") / grid.budget_tag(self.budget) / self.variant / f"seed{self.seed}"


def parse_seeds(text: str, depths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``"3"`` (3 seeds for every depth) or ``"4:3,8:2"`` (per depth) -> ((depth, count), ...)."""
    text = text.strip()
    try:
        if ":" not in text:
            n = int(text)
            return tuple((int(d), n) for d in depths)
        pairs = []
        for item in text.split(","):
            d, _, n = item.partition(":")
            pairs.append((int(d), int(n)))
    except ValueError:
        raise ExperimentError(
            f"seeds: expected a count like '3' or per depth like '4:3,8:2', got {text!r}"
        ) from None
    given = [d for d, _ in pairs]
    if sorted(given) != sorted(int(d) for d in depths) or len(set(given)) != len(given):
        raise ExperimentError(f"seeds: {text!r} must give one count for each depth {list(depths)}")
    return tuple(pairs)

"""Controlled comparisons of the paper's variants: a resumable grid of training runs and its
report (held-out bits/dim as mean ± standard deviation over seeds, parameters, training time,
sampling time, legible-digit share, learning curves).

::

    grid.py     GridConfig (the declaration: budgets x convs x couplings x depths x seeds),
                RunSpec (one run and its folder), parse_seeds
    run.py      run_one (train or resume one run, measure its sampling, write result.json),
                run_grid (every run, the report after each), grid_status, warm_up
    report.py   mean_std, summarize, the tables, the seed-paired claims, write_report
                (report.md, results.csv, curves_<budget>.png)

Imports point down this list: run uses grid and report; report uses grid.
"""

from flownp.experiment.grid import BUDGETS, ExperimentError, GridConfig, RunSpec, parse_seeds
from flownp.experiment.report import (
    REPORT_COLUMNS,
    format_claims,
    format_mean_std,
    format_table,
    mean_std,
    paired_differences,
    plot_curves,
    seed_band,
    summarize,
    write_report,
)
from flownp.experiment.run import (
    GRID_FILE,
    RESULT_FILE,
    grid_status,
    run_grid,
    run_one,
    run_state,
    warm_up,
)

__all__ = [
    "BUDGETS",
    "GRID_FILE",
    "REPORT_COLUMNS",
    "RESULT_FILE",
    "ExperimentError",
    "GridConfig",
    "RunSpec",
    "format_claims",
    "format_mean_std",
    "format_table",
    "grid_status",
    "mean_std",
    "paired_differences",
    "parse_seeds",
    "plot_curves",
    "run_grid",
    "run_one",
    "run_state",
    "seed_band",
    "summarize",
    "warm_up",
    "write_report",
]

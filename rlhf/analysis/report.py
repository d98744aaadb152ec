"""Sweep reports: collect the jobs of a Hydra multirun, tabulate their final metrics, fit the gold-vs-KL frontier
and draw it.

A job is any folder under the sweep folder that holds ``.hydra/config.yaml``. It is *finished* when it holds a
complete ``checkpoints/step_<max_steps>``; every other job (crashed, killed, still running) is listed as unfinished
with the reason, never dropped. Jobs that have not started yet have no folder and cannot be listed.

"Final" values are the mean over the last ``window`` logged steps of a run (10 by default): one step of the built-in
task scores 64 samples, too few for a single step to rank betas.

A run that logged no KL at all (beta = 0 with ``kl.log_at_zero_beta`` off loads no reference model and logs
``"kl": null``) stays in the tables with its scores and ``n/a`` for KL, is left out of everything measured
against KL (frontier plot, fits, KL budget, KL ordering) and gets one ``note:`` line in the summary naming the
flag.

Frontier fits follow Gao et al. (2022, "Scaling laws for reward model overoptimization"). With ``d = sqrt(KL)``
(KL in nats per sequence) and ``R`` the gold-score gain over the starting policy:

    RL:   R(d) = d (alpha - beta log d)
    BoN:  R(d) = d (alpha - beta d)

Both are linear in (alpha, beta) and pass through R(0) = 0, so they are fit by least squares with no intercept.
``R^2 = 1 - RSS / TSS`` with TSS taken around the mean gain.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import yaml

from rlhf.config import ConfigError
from rlhf.core.registry import Registry
from rlhf.runtime.checkpoint import list_checkpoints

DEFAULT_WINDOW = 10
"""Logged steps averaged into one "final" value (and into one point of a trajectory)."""

FRONTIER_FORMS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry("frontier form")


# ---------------------------------------------------------------------------------------------------- collect
@dataclass(frozen=True)
class Job:
    """One job of a sweep: the config Hydra saved for it, its logged metrics and whether it finished."""

    name: str              # job folder relative to the sweep folder
    path: str
    config: dict           # .hydra/config.yaml as plain data (interpolations such as run_dir left unresolved)
    metrics: list[dict]    # metrics.jsonl rows in step order; JSON null (a NaN at log time) read back as nan
    finished: bool
    reason: str            # why the run is unfinished; "" when finished

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def max_steps(self) -> int:
        return int(self.config["trainer"]["max_steps"])


@dataclass(frozen=True)
class Run(Job):
    """A policy-optimisation job (scripts/train_policy.py); DPO jobs are rlhf.analysis.methods.DirectRun."""

    @property
    def beta(self) -> float:
        """The configured (initial) KL coefficient."""
        return float(self.config["kl"]["beta"])

    @property
    def controller(self) -> str:
        return str(self.config["kl"].get("controller", "fixed"))

    @property
    def target(self) -> float:
        return float(self.config["kl"]["target"])

    @property
    def steps_done(self) -> int:
        return int(self.metrics[-1]["step"]) + 1 if self.metrics else 0

    @property
    def logged_kl(self) -> bool:
        """True when some logged step has a finite KL."""
        return bool(np.isfinite(series(self.metrics, "kl")).any())


NO_KL = "n/a"
"""KL cell (report.csv, report.md) of a run that logged steps but no KL; pandas reads it as NaN."""


def no_kl_note(run: Run) -> str:
    """The one summary line for a run that logged steps but no KL."""
    flag = run.config.get("kl", {}).get("log_at_zero_beta", False)
    if run.beta == 0 and flag is not True:
        setting = "null (auto), which left it off" if flag is None else "false"
        return (f"note: {run.name} (beta=0) logged no KL: it ran with kl.log_at_zero_beta={setting}, so it "
                "is not on the frontier; rerun it with kl.log_at_zero_beta=true")
    return (f"note: {run.name} (beta={run.beta:g}) logged no KL, so it is not on the frontier "
            f"(kl.log_at_zero_beta={str(flag).lower()} in its config; check its metrics.jsonl)")


def runs_without_kl(runs: Sequence[Run]) -> list[Run]:
    """Runs that logged at least one step and no finite KL (a run with no steps yet is only "unfinished")."""
    return [r for r in runs if r.metrics and not r.logged_kl]


def _natural_key(name: str) -> list:
    # "10_beta=..." sorts after "9_beta=...": Hydra numbers jobs without zero padding.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_job_dirs(sweep_dir: str) -> list[str]:
    """Folders under ``sweep_dir`` (itself included, so a single run works too) that hold ``.hydra/config.yaml``,
    in Hydra's job order."""
    if not os.path.isdir(sweep_dir):
        raise ConfigError(f"sweep_dir: {sweep_dir!r} is not a folder")
    found = []
    for dirpath, dirnames, _ in os.walk(sweep_dir):
        if os.path.isfile(os.path.join(dirpath, ".hydra", "config.yaml")):
            found.append(dirpath)
            dirnames.clear()  # a job folder holds no further jobs; skip its checkpoints and event files
    return sorted(found, key=lambda p: _natural_key(os.path.relpath(p, sweep_dir)))


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl``; ``[]`` when the file does not exist yet.

    A last line cut short by a writer still running is skipped; a broken line before it raises ValueError.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"metrics file {path}: line {i + 1} is not JSON") from None
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def run_status(job_dir: str, max_steps: int, metrics: list[dict]) -> tuple[bool, str]:
    """(finished, reason): finished means a complete final checkpoint and a logged last step."""
    if not metrics:
        return False, "no metrics logged (crashed before the first step, or not started)"
    done = int(metrics[-1]["step"]) + 1
    steps = [s for s, _ in list_checkpoints(os.path.join(job_dir, "checkpoints"))]
    if max_steps not in steps:
        return False, f"logged {done} of {max_steps} steps, no complete checkpoints/step_{max_steps}"
    if done < max_steps:
        return False, f"final checkpoint present but metrics stop at step {done} of {max_steps}"
    return True, ""


def load_run(job_dir: str, sweep_dir: str) -> Run:
    """Read one job folder."""
    with open(os.path.join(job_dir, ".hydra", "config.yaml")) as f:
        config = yaml.safe_load(f)
    metrics = read_metrics(os.path.join(job_dir, "metrics.jsonl"))
    finished, reason = run_status(job_dir, int(config["trainer"]["max_steps"]), metrics)
    name = os.path.relpath(job_dir, sweep_dir)
    return Run(name, job_dir, config, metrics, finished, reason)


def collect_runs(sweep_dir: str) -> list[Run]:
    """Every RL job of the sweep, finished or not (DPO jobs are rlhf.analysis.methods'). Raises ConfigError when
    the sweep holds no job at all."""
    return collect_jobs(sweep_dir)[0]


def job_kind(job_dir: str) -> str:
    """``"rl"`` (scripts/train_policy.py: a ``kl`` section), ``"dpo"`` (a ``dpo`` section) or ``"other"`` (an SFT
    or reward stage's folder, which a report has nothing to plot from)."""
    with open(os.path.join(job_dir, ".hydra", "config.yaml")) as f:
        config = yaml.safe_load(f) or {}
    return "dpo" if "dpo" in config else "rl" if "kl" in config else "other"


def collect_jobs(sweep_dir: str) -> tuple[list[Run], list, list[str]]:
    """The sweep's RL runs, its DPO runs (``rlhf.analysis.methods.DirectRun``), finished or not, and the names of
    the other job folders (SFT, reward), which are left out. Raises ConfigError when there is no job folder."""
    from rlhf.analysis.methods import load_direct_run

    dirs = find_job_dirs(sweep_dir)
    if not dirs:
        raise ConfigError(f"sweep_dir: no job folder (with .hydra/config.yaml) under {sweep_dir!r}")
    kinds = [job_kind(d) for d in dirs]
    return ([load_run(d, sweep_dir) for d, k in zip(dirs, kinds) if k == "rl"],
            [load_direct_run(d, sweep_dir) for d, k in zip(dirs, kinds) if k == "dpo"],
            [os.path.relpath(d, sweep_dir) for d, k in zip(dirs, kinds) if k == "other"])


# ---------------------------------------------------------------------------------------------------- tables
def series(metrics: list[dict], key: str) -> np.ndarray:
    """``(n_logged,)`` values of ``key`` in step order; nan where a row lacks it."""
    return np.array([float(row.get(key, math.nan)) for row in metrics], dtype=float)


def final_value(metrics: list[dict], key: str, window: int = DEFAULT_WINDOW) -> float:
    """Mean of ``key`` over the last ``window`` logged rows, ignoring nan; nan when none is finite."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tail = series(metrics[-window:], key)
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else math.nan


def block_means(values: np.ndarray, window: int) -> np.ndarray:
    """``(n,)`` -> ``(n // window,)`` means of consecutive blocks, aligned so the last block ends at the last value
    (the last block is the "final" value); the first ``n % window`` values are dropped."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = values.size // window
    return values[values.size - n * window:].reshape(n, window).mean(axis=1)


def sweep_axis(runs: Sequence[Run]) -> str:
    """``"target"`` when every run uses the adaptive controller (a kl_target sweep), else ``"beta"``."""
    return "target" if runs and all(r.controller == "adaptive" for r in runs) else "beta"


def has_gold(runs: Sequence[Run]) -> bool:
    """True when some run logged a finite gold_score."""
    return any(np.isfinite(series(r.metrics, "gold_score")).any() for r in runs)


METRIC_COLUMNS = ["score", "kl", "reward", "gold_score", "final_beta"]


def run_row(run: Run, axis: str, window: int = DEFAULT_WINDOW) -> dict:
    """One CSV row: the swept value, seed, status, steps and final metrics of one run."""
    row = {axis: run.target if axis == "target" else run.beta, "seed": run.seed, "status":
           "finished" if run.finished else "unfinished", "steps": run.steps_done, "max_steps": run.max_steps}
    for key in METRIC_COLUMNS:
        row[key] = final_value(run.metrics, "beta" if key == "final_beta" else key, window)
    row["job"] = run.name
    row["reason"] = run.reason
    row["logged_kl"] = run.logged_kl or not run.metrics  # False only for a run that logged steps without KL
    return row


def group_rows(rows: Sequence[dict], axis: str) -> list[dict]:
    """Finished rows grouped by the swept value: ``n`` seeds, and ``<metric>_mean`` / ``<metric>_std`` (sample
    standard deviation, ddof=1; nan for a single seed), sorted by the swept value."""
    groups: dict[float, list[dict]] = {}
    for row in rows:
        if row["status"] == "finished":
            groups.setdefault(row[axis], []).append(row)
    out = []
    for value in sorted(groups):
        members = groups[value]
        g = {axis: value, "n": len(members)}
        for key in METRIC_COLUMNS:
            x = np.array([m[key] for m in members], dtype=float)
            x = x[np.isfinite(x)]
            g[f"{key}_mean"] = float(x.mean()) if x.size else math.nan
            g[f"{key}_std"] = float(x.std(ddof=1)) if x.size > 1 else math.nan
        out.append(g)
    return out


def kl_monotone(groups: Sequence[dict], decreasing: bool = True) -> bool:
    """True when the mean final KL strictly decreases (a beta sweep) or, with ``decreasing=False``, increases (a
    KL-target sweep) as the swept value grows; ``groups`` sorted by it, as ``group_rows`` returns them."""
    kls = [g["kl_mean"] for g in groups]
    pairs = list(zip(kls, kls[1:]))
    return len(kls) >= 2 and all(a > b if decreasing else a < b for a, b in pairs)


def best_lines(groups: Sequence[dict], axis: str, gold: bool, kl_budget: float | None = None) -> list[str]:
    """Sentences naming the best swept value: by gold score (when logged), else by score; with ``kl_budget``, the
    best score among values whose mean final KL is at most the budget."""
    if not groups:
        return ["No finished run: nothing to rank."]
    name = "β" if axis == "beta" else "KL target"
    lines = []
    key = "gold_score" if gold else "score"
    best = max(groups, key=lambda g: _finite_or(g[f"{key}_mean"], -math.inf))
    kl = f"final KL {_pm(best, 'kl', 2)} nats" if math.isfinite(best["kl_mean"]) else "no KL logged"
    lines.append(f"Best {'gold score' if gold else 'score'}: {name} = {best[axis]:g} "
                 f"({key} {_pm(best, key, 3)}, {kl}, {best['n']} seeds).")
    with_kl = [g for g in groups if math.isfinite(g["kl_mean"])]
    if kl_budget is not None and not with_kl:
        lines.append(f"No {name} logged KL, so the KL budget of {kl_budget:g} nats cannot be checked.")
    elif kl_budget is not None:
        within = [g for g in with_kl if g["kl_mean"] <= kl_budget]
        if within:
            b = max(within, key=lambda g: _finite_or(g["score_mean"], -math.inf))
            extra = f", gold {_pm(b, 'gold_score', 3)}" if gold else ""
            lines.append(f"Best score with mean final KL <= {kl_budget:g} nats: {name} = {b[axis]:g} "
                         f"(score {_pm(b, 'score', 3)}{extra}, KL {_pm(b, 'kl', 2)}).")
        else:
            least = min(with_kl, key=lambda g: g["kl_mean"])
            lines.append(f"No {name} stays within a KL budget of {kl_budget:g} nats; the lowest mean final KL is "
                         f"{least['kl_mean']:.2f} at {name} = {least[axis]:g}.")
    return lines


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def _pm(group: dict, key: str, digits: int, missing: str = "—") -> str:
    mean, std = group[f"{key}_mean"], group[f"{key}_std"]
    if not math.isfinite(mean):
        return missing
    return f"{mean:.{digits}f}" if not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(rows: Sequence[dict], path: str) -> str:
    """Write ``rows`` (dicts with the same keys) to ``path``; nan is written as an empty cell, the KL of a run
    that logged no KL (``logged_kl`` False, a column not written) as ``n/a``."""
    if not rows:
        raise ValueError("rows is empty")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "logged_kl"])
        w.writeheader()
        for row in rows:
            out = {k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
                   if k != "logged_kl"}
            if not row.get("logged_kl", True):
                out["kl"] = NO_KL
            w.writerow(out)
    return path


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def group_table(groups: Sequence[dict], axis: str, gold: bool) -> str:
    """Markdown table of mean ± std over seeds per swept value."""
    header = ["β" if axis == "beta" else "KL target", "seeds", "final score", "final KL (nats)", "final reward"]
    header += ["final gold score"] if gold else []
    header += ["final β"] if axis == "target" else []
    body = []
    for g in groups:
        row = [f"{g[axis]:g}", g["n"], _pm(g, "score", 3), _pm(g, "kl", 2, NO_KL), _pm(g, "reward", 3)]
        row += [_pm(g, "gold_score", 3)] if gold else []
        row += [_pm(g, "final_beta", 4)] if axis == "target" else []
        body.append(row)
    return markdown_table(header, body)


def _cell(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


def run_table(rows: Sequence[dict], axis: str, gold: bool) -> str:
    """Markdown table with one line per run (finished or not)."""
    header = ["β" if axis == "beta" else "KL target", "seed", "status", "steps", "score", "KL", "reward"]
    header += ["gold"] if gold else []
    header += ["job"]
    body = []
    for r in rows:
        line = [f"{r[axis]:g}", r["seed"], r["status"], f"{r['steps']}/{r['max_steps']}", _cell(r["score"], 3),
                _cell(r["kl"], 2) if r.get("logged_kl", True) else NO_KL, _cell(r["reward"], 3)]
        line += [_cell(r["gold_score"], 3)] if gold else []
        line += [f"`{r['job']}`"]
        body.append(line)
    return markdown_table(header, body)


# ---------------------------------------------------------------------------------------------------- fits
@FRONTIER_FORMS.register("rl")
def rl_features(d: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(n, 2)`` columns [d, -d log d] of R(d) = d (alpha - beta log d); d log d -> 0 at d = 0."""
    safe = np.where(d > 0, d, 1.0)
    return np.stack([d, np.where(d > 0, -d * np.log(safe), 0.0)], axis=1)


@FRONTIER_FORMS.register("bon")
def bon_features(d: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(n, 2)`` columns [d, -d^2] of R(d) = d (alpha - beta d)."""
    return np.stack([d, -d * d], axis=1)


class FrontierFit(NamedTuple):
    """Gao et al.'s ``alpha`` and ``beta`` (a fit parameter, not the KL coefficient) for ``form`` "rl" or "bon",
    with R^2 and the number of points fitted."""

    form: str
    alpha: float
    beta: float
    r2: float
    n: int


def _check_points(d, gain) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(d, dtype=float)
    gain = np.asarray(gain, dtype=float)
    if d.ndim != 1 or gain.shape != d.shape:
        raise ValueError(f"d and gain must be 1-D of one length, got shapes {d.shape} and {gain.shape}")
    if not (np.isfinite(d).all() and np.isfinite(gain).all()):
        raise ValueError("d and gain must be finite")
    if (d < 0).any():
        raise ValueError(f"d must be >= 0 (it is sqrt(KL)), got min {d.min()}")
    return d, gain


def fit_frontier(d, gain, form: str) -> FrontierFit:
    """Least-squares (alpha, beta) of the named form ("rl" or "bon") through R(0) = 0.

    ``d``: ``(n,)`` sqrt(KL) >= 0; ``gain``: ``(n,)`` gold-score gains. Needs n >= 2.
    """
    d, gain = _check_points(d, gain)
    if d.size < 2:
        raise ValueError(f"d: need at least 2 points to fit 2 parameters, got {d.size}")
    features = FRONTIER_FORMS.get(form)(d)
    (alpha, beta), *_ = np.linalg.lstsq(features, gain, rcond=None)
    rss = float(np.sum((gain - features @ np.array([alpha, beta])) ** 2))
    tss = float(np.sum((gain - gain.mean()) ** 2))
    r2 = 1.0 - rss / tss if tss > 0 else math.nan
    return FrontierFit(form, float(alpha), float(beta), r2, int(d.size))


def frontier_curve(d, fit: FrontierFit) -> np.ndarray:
    """``(n,)`` predicted gains R(d) of ``fit`` at ``d``."""
    d = np.asarray(d, dtype=float)
    return FRONTIER_FORMS.get(fit.form)(d) @ np.array([fit.alpha, fit.beta])


class Trajectory(NamedTuple):
    """A run's path through (sqrt(KL), gain) space, one point per block of ``window`` logged steps."""

    run: Run
    value: float         # the swept value (beta or target)
    d: np.ndarray        # (n_blocks,) sqrt of the block-mean KL (negative k1 estimates clipped to 0)
    gain: np.ndarray     # (n_blocks,) block-mean metric minus the seed's starting value


def start_values(runs: Sequence[Run], metric: str) -> dict[int, float]:
    """Per seed, the mean of ``metric`` at step 0 over that seed's runs.

    Step 0 is sampled from the untouched starting policy with the seed's prompts and sampling seed, so every run
    of one seed logs the same step-0 value whatever its beta.
    """
    values: dict[int, list[float]] = {}
    for r in runs:
        first = [row for row in r.metrics if row["step"] == 0]
        if first and math.isfinite(first[0].get(metric, math.nan)):
            values.setdefault(r.seed, []).append(first[0][metric])
    return {s: float(np.mean(v)) for s, v in values.items()}


def trajectories(runs: Sequence[Run], axis: str, metric: str, window: int = DEFAULT_WINDOW) -> list[Trajectory]:
    """Block-mean trajectories of the finished runs that logged KL and whose seed has a step-0 value of
    ``metric``."""
    start = start_values(runs, metric)
    out = []
    for r in runs:
        if not r.finished or not r.logged_kl or r.seed not in start:
            continue
        kl = block_means(series(r.metrics, "kl"), window)
        y = block_means(series(r.metrics, metric), window)
        ok = np.isfinite(kl) & np.isfinite(y)
        value = r.target if axis == "target" else r.beta
        out.append(Trajectory(r, value, np.sqrt(np.clip(kl[ok], 0.0, None)), y[ok] - start[r.seed]))
    return out


def final_residuals(trajs: Sequence[Trajectory], fit: FrontierFit) -> dict[float, list[float]]:
    """Per swept value, the residual (gain - R(d)) of each run's final point from ``fit``."""
    out: dict[float, list[float]] = {}
    for t in trajs:
        if t.d.size:
            out.setdefault(t.value, []).append(float(t.gain[-1] - frontier_curve(t.d[-1:], fit)[0]))
    return dict(sorted(out.items()))


def frontier_verdict(residuals: dict[float, list[float]], axis: str) -> str:
    """One sentence: does the swept KL setting move the gold-vs-KL frontier, or only where runs stop on it?

    Compares each value's mean final residual from one pooled fit with 2 standard errors, the standard error taken
    from the seed-to-seed spread pooled over all values (one spread per value is too noisy with 2 seeds).
    """
    name = "β" if axis == "beta" else "KL target"
    groups = {v: np.array(r) for v, r in residuals.items() if len(r)}
    dev = [g - g.mean() for g in groups.values() if g.size > 1]
    dof = sum(g.size - 1 for g in dev)
    if dof == 0:
        return (f"Undecided: the frontier test needs at least two seeds of one {name} to measure the "
                "seed-to-seed spread.")
    sd = math.sqrt(sum(float((g**2).sum()) for g in dev) / dof)
    means = {v: float(g.mean()) for v, g in groups.items()}
    off = {v: m for v, m in means.items() if abs(m) > 2 * sd / math.sqrt(groups[v].size)}
    spread = ", ".join(f"{name}={v:g}: {m:+.3f}" for v, m in means.items())
    if not off:
        return (f"Every {name}'s runs end on one shared frontier: their mean residuals from one RL fit pooled "
                f"over all runs ({spread}) are all within 2 standard errors (seed spread {sd:.3f}), so these data "
                "show the KL setting moving where a run stops on the gold-vs-KL frontier, not the frontier itself.")
    above = [f"{v:g}" for v, m in off.items() if m > 0]
    below = [f"{v:g}" for v, m in off.items() if m < 0]
    parts = ([f"above it for {name} = {', '.join(above)}"] if above else []) + \
            ([f"below it for {name} = {', '.join(below)}"] if below else [])
    return (f"The KL setting moves the frontier: final points sit beyond 2 standard errors (seed spread {sd:.3f}) "
            f"from one RL fit pooled over all runs, {' and '.join(parts)} (mean residuals {spread}).")


# ---------------------------------------------------------------------------------------------------- plots
def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.4)):
    # Figure, not pyplot: no global state and no GUI backend, so reports render in tests and on headless nodes.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def value_colours(values: Sequence[float]) -> dict[float, tuple]:
    """One viridis colour per distinct swept value, in sorted order (dark = small)."""
    from matplotlib import colormaps

    distinct = sorted(set(values))
    cmap = colormaps["viridis"]
    return {v: cmap(0.85 * i / max(len(distinct) - 1, 1)) for i, v in enumerate(distinct)}


def _label(axis: str, value: float) -> str:
    return f"β = {value:g}" if axis == "beta" else f"KL target = {value:g}"


def _log_if_wide(ax, values, which: str = "x") -> None:
    """Log scale when the positive values span more than a factor of 5 (KL grows roughly exponentially in 1/β)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size and (v > 0).all() and v.max() / v.min() > 5:
        _log_axis(ax, which)


def _log_axis(ax, which: str) -> None:
    """Log scale labelled 1, 2, 5, 10, 20, ... in plain numbers (the default 2x10^0 labels collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_frontier(rows: Sequence[dict], axis: str, path: str, window: int = DEFAULT_WINDOW,
                  kl_budget: float | None = None) -> str:
    """Final score against final KL, one point per finished run with a final KL, coloured by the swept value
    (and the KL budget as a vertical line)."""
    done = [r for r in rows if r["status"] == "finished" and math.isfinite(r["kl"])]
    # colours from every finished run, with or without KL: the same colours as curves.png
    colours = value_colours([r[axis] for r in rows if r["status"] == "finished"])
    fig, axes = _figure()
    ax = axes[0, 0]
    for value, colour in colours.items():
        pts = [r for r in done if r[axis] == value]
        if not pts:  # this setting logged no KL
            continue
        ax.scatter([r["kl"] for r in pts], [r["score"] for r in pts], s=60, color=colour, edgecolor="black",
                   linewidth=0.5, label=_label(axis, value))
    if kl_budget is not None:
        ax.axvline(kl_budget, color="tab:red", ls=":", lw=1.5, label=f"KL budget {kl_budget:g}")
    _log_if_wide(ax, [r["kl"] for r in done] + ([kl_budget] if kl_budget is not None else []))
    ax.set_xlabel(f"final KL(π ‖ π_ref), nats per sequence (mean of last {window} steps)")
    ax.set_ylabel(f"final proxy score (mean of last {window} steps)")
    ax.set_title("Reward-KL frontier: one point per run")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(title="one colour per setting", fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_overoptimisation(trajs_score: Sequence[Trajectory], trajs_gold: Sequence[Trajectory], axis: str,
                          path: str, colours: dict[float, tuple] | None = None) -> str:
    """Proxy and gold score gains along training against KL (Gao et al. 2022, Fig. 1), one colour per setting
    (``colours``: value -> colour, by default from the trajectories' values)."""
    from matplotlib.lines import Line2D

    gold_by_run = {t.run.name: t for t in trajs_gold}
    pairs = [(ts, gold_by_run[ts.run.name]) for ts in trajs_score if ts.run.name in gold_by_run]
    shown = {ts.value for ts, _ in pairs}
    colours = {v: c for v, c in (colours or value_colours(list(shown))).items() if v in shown}
    same = all(np.allclose(a.gain, b.gain) for a, b in pairs)
    fig, axes = _figure(size=(7.0, 4.6))
    ax = axes[0, 0]
    for ts, tg in pairs:
        c = colours[ts.value]
        ax.plot(ts.d**2, ts.gain, "-o", color=c, ms=3, lw=1.2, alpha=0.9)
        ax.plot(tg.d**2, tg.gain, "--x", color=c, ms=4, lw=1.2, alpha=0.9)
    _log_if_wide(ax, [k for ts, _ in pairs for k in ts.d**2 if k > 0])
    handles = [Line2D([], [], color=c, lw=2, label=_label(axis, v)) for v, c in colours.items()]
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=3, label="proxy score (optimised)"),
                Line2D([], [], color="gray", ls="--", marker="x", ms=4, label="gold score (true)")]
    ax.legend(handles=handles, fontsize=8, ncol=2)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (block means along training)")
    ax.set_ylabel("score gain over the starting policy")
    title = "Proxy vs gold score along training"
    ax.set_title(title + ("\n(proxy = gold on this task: the curves coincide)" if same else ""))
    ax.axhline(0.0, color="black", lw=0.6)
    ax.grid(True, alpha=0.3, which="both")
    fig.savefig(path, dpi=120)
    return path


def plot_curves(runs: Sequence[Run], axis: str, path: str, window: int = DEFAULT_WINDOW,
                metric: str = "score") -> str:
    """``metric`` and KL over steps: one curve per setting (mean over seeds of a ``window``-step moving average),
    shaded between the seeds' extremes."""
    done = [r for r in runs if r.finished]
    values = [r.target if axis == "target" else r.beta for r in done]
    colours = value_colours(values)
    fig, axes = _figure(2, 1, size=(6.8, 6.6))
    for ax, key in zip(axes[:, 0], (metric, "kl")):
        for value, colour in colours.items():
            curves = [_moving_average(series(r.metrics, key), window) for r, v in zip(done, values)
                      if v == value and (key != "kl" or r.logged_kl)]
            if not curves:  # every run of this setting logged no KL
                continue
            n = min(c.size for c in curves)
            stack = np.stack([c[:n] for c in curves])
            steps = np.arange(n)
            ax.plot(steps, stack.mean(0), color=colour, lw=1.6, label=_label(axis, value))
            if len(curves) > 1:
                ax.fill_between(steps, stack.min(0), stack.max(0), color=colour, alpha=0.2, lw=0)
        ax.grid(True, alpha=0.3, which="both")
    axes[0, 0].set_ylabel(f"{metric.replace('_', ' ')} ({window}-step moving average)")
    axes[1, 0].set_ylabel("KL(π ‖ π_ref), nats (log scale)")
    _log_axis(axes[1, 0], "y")
    without = sorted({v for r, v in zip(done, values) if not r.logged_kl}
                     - {v for r, v in zip(done, values) if r.logged_kl})
    if without:  # runs with kl.log_at_zero_beta off: say why their KL curve is missing
        axes[1, 0].text(0.98, 0.04, "no KL logged: " + ", ".join(_label(axis, v) for v in without),
                        transform=axes[1, 0].transAxes, ha="right", va="bottom", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    axes[1, 0].set_xlabel("training step")
    axes[0, 0].set_title("Training curves: mean over seeds, band = min..max over seeds")
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120)
    return path


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values, same length as ``x`` (so curves start at step 0)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_bon_vs_rl(trajs: Sequence[Trajectory], rl_fit: FrontierFit, axis: str, path: str,
                   bon: Sequence[dict] | None = None, bon_fit: FrontierFit | None = None,
                   metric: str = "gold_score", colours: dict[float, tuple] | None = None) -> str:
    """Gain against d = sqrt(KL): RL trajectories and final points (one colour per setting, ``colours`` by
    default from the trajectories' values) with the pooled RL fit, and best-of-n points (``bon`` rows with
    ``d`` and ``gain``) with their fit."""
    colours = colours or value_colours([t.value for t in trajs])
    fig, axes = _figure(size=(7.0, 4.8))
    ax = axes[0, 0]
    labelled = set()
    for t in trajs:
        c = colours[t.value]
        ax.plot(t.d, t.gain, "-", color=c, lw=0.8, alpha=0.5)
        ax.scatter(t.d[-1:], t.gain[-1:], s=60, color=c, edgecolor="black", linewidth=0.5, zorder=3,
                   label=None if t.value in labelled else f"RL final, {_label(axis, t.value)}")
        labelled.add(t.value)
    d_max = max([float(t.d.max()) for t in trajs if t.d.size] + [float(r["d"]) for r in bon or []] + [1.0])
    grid = np.linspace(0.0, d_max * 1.05, 200)
    ax.plot(grid, frontier_curve(grid, rl_fit), color="tab:red", lw=2,
            label=f"RL fit d(α − β log d): α={rl_fit.alpha:.3f}, β={rl_fit.beta:.3f}, R²={rl_fit.r2:.2f}")
    if bon:
        ax.scatter([r["d"] for r in bon], [r["gain"] for r in bon], marker="s", s=40, color="black", zorder=4,
                   label="best-of-n, n = 1 … " + f"{max(int(r['n']) for r in bon)}")
    if bon_fit is not None:
        bon_grid = grid[grid <= max(r["d"] for r in bon) * 1.5]
        ax.plot(bon_grid, frontier_curve(bon_grid, bon_fit), color="black", lw=1.5, ls="--",
                label=f"BoN fit d(α − β d): α={bon_fit.alpha:.3f}, β={bon_fit.beta:.3f}, R²={bon_fit.r2:.2f}")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("d = sqrt(KL(π ‖ π_ref)), sqrt(nats)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} gain over the starting policy")
    ax.set_title("Best-of-n and RL on one frontier (Gao et al. 2022 forms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------- report
class Report(NamedTuple):
    runs: list[Run]
    rows: list[dict]            # one per RL run (report.csv)
    groups: list[dict]          # one per swept value, finished RL runs only
    summary: list[str]          # the sentences printed and put at the top of report.md
    files: list[str]            # everything written
    direct: list = []           # the DPO runs (rlhf.analysis.methods.DirectRun)
    direct_rows: list[dict] = []  # one per DPO run (dpo.csv)


def write_report(sweep_dir: str, out_dir: str, window: int = DEFAULT_WINDOW, kl_budget: float | None = None,
                 bon_path: str | None = None) -> Report:
    """Collect the sweep, write report.csv, report.md and the PNG plots into ``out_dir``; with DPO jobs in the sweep
    also dpo.csv and the three-way frontier (rlhf.analysis.methods)."""
    from rlhf.analysis.best_of_n import mean_over_seeds, read_bon_csv
    from rlhf.analysis.methods import direct_section

    runs, direct, others = collect_jobs(sweep_dir)
    if not runs and not direct:
        raise ConfigError(f"sweep_dir: {sweep_dir!r} holds no policy or DPO run, only {', '.join(others)}")
    axis = sweep_axis(runs)
    gold = has_gold(runs)
    metric = "gold_score" if gold else "score"
    rows = [run_row(r, axis, window) for r in runs]
    groups = group_rows(rows, axis)
    os.makedirs(out_dir, exist_ok=True)
    files = [write_csv(rows, os.path.join(out_dir, "report.csv"))] if rows else []
    summary = summary_lines(runs, groups, axis, gold, kl_budget) if runs else []
    if others:
        summary.append(f"Left out {len(others)} job folders that are neither policy nor DPO runs: "
                       f"{', '.join(others)}.")
    if bon_path is None and os.path.exists(os.path.join(sweep_dir, "best_of_n.csv")):
        bon_path = os.path.join(sweep_dir, "best_of_n.csv")
    bon = mean_over_seeds(read_bon_csv(bon_path)) if bon_path is not None else None

    fit_lines: list[str] = []
    images: list[tuple[str, str]] = []
    trajs: list[Trajectory] = []
    if groups:
        if any(r["status"] == "finished" and math.isfinite(r["kl"]) for r in rows):
            images.append(("Reward-KL frontier", plot_frontier(
                rows, axis, os.path.join(out_dir, "frontier.png"), window, kl_budget)))
        images.append(("Training curves", plot_curves(runs, axis, os.path.join(out_dir, "curves.png"), window,
                                                      metric)))
        trajs = trajectories(runs, axis, metric, window)  # runs without KL have none
        colours = value_colours([g[axis] for g in groups])  # every finished setting, one colour in all plots
        if gold and trajs:
            images.append(("Proxy vs gold score (over-optimisation)", plot_overoptimisation(
                trajectories(runs, axis, "score", window), trajs, axis,
                os.path.join(out_dir, "overoptimisation.png"), colours)))
        d = np.concatenate([t.d for t in trajs]) if trajs else np.zeros(0)
        if d.size >= 2:
            rl_fit = fit_frontier(d, np.concatenate([t.gain for t in trajs]), "rl")
            fit_lines.append(_fit_line("RL", rl_fit, f"{len(trajs)} runs x block means of {window} steps"))
            bon_fit = None
            if bon is not None and len(bon) >= 2:
                bon_fit = fit_frontier([r["d"] for r in bon], [r["gain"] for r in bon], "bon")
                fit_lines.append(_fit_line("BoN", bon_fit, f"n = 1 … {bon[-1]['n']}, mean over seeds"))
            fit_lines.append(frontier_verdict(final_residuals(trajs, rl_fit), axis))
            images.append(("Gain vs sqrt(KL): best-of-n and RL", plot_bon_vs_rl(
                trajs, rl_fit, axis, os.path.join(out_dir, "frontier_fit.png"), bon, bon_fit, metric,
                colours)))
    files += [p for _, p in images]
    section = None
    if direct:  # RL points join the comparison only when they are gold scores, as DPO's and best-of-n's are
        section = direct_section(direct, trajs if gold else [], bon, out_dir, axis, kl_budget)
        files += section.files
    files.append(_write_markdown(os.path.join(out_dir, "report.md"), sweep_dir, axis, gold, window, runs, rows,
                                 groups, summary, fit_lines, images, bon, section))
    return Report(runs, rows, groups, summary + fit_lines + (section.lines if section else []), files,
                  direct, section.rows if section else [])


def summary_lines(runs: list, groups: list[dict], axis: str, gold: bool, kl_budget: float | None) -> list[str]:
    """The report's verdict lines: runs without KL, the best setting (within the KL budget), whether the mean final
    KL moves monotonically with the swept value, and the unfinished runs."""
    no_kl = runs_without_kl(runs)
    summary = [no_kl_note(r) for r in no_kl]
    if no_kl and len(no_kl) == sum(bool(r.metrics) for r in runs):
        summary.append("No run logged KL: the tables list scores only, with no frontier plot or fit.")
    summary += best_lines(groups, axis, gold, kl_budget)
    with_kl = [g for g in groups if math.isfinite(g["kl_mean"])]
    if len(with_kl) >= 2:
        kls = ", ".join(f"{g['kl_mean']:.2f}" for g in with_kl)
        way = "decrease" if axis == "beta" else "increase"
        ok = kl_monotone(with_kl, decreasing=axis == "beta")
        name = "β" if axis == "beta" else "KL target"
        left_out = "" if len(with_kl) == len(groups) else ", settings without KL left out"
        summary.append(f"Mean final KL {way + 's' if ok else 'does NOT ' + way} monotonically as {name} grows "
                       f"({kls} nats{left_out}).")
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        summary.append(f"{len(unfinished)} of {len(runs)} runs are unfinished and left out of the means: "
                       + "; ".join(f"{r.name} ({r.reason})" for r in unfinished) + ".")
    return summary


def _fit_line(name: str, fit: FrontierFit, points: str) -> str:
    return f"{name} fit: α = {fit.alpha:.4f}, β = {fit.beta:.4f}, R² = {fit.r2:.3f} ({fit.n} points: {points})."


def _write_markdown(path, sweep_dir, axis, gold, window, runs, rows, groups, summary, fit_lines, images,
                    bon, section=None) -> str:
    finished = sum(r.finished for r in runs)
    name = "β (`kl.beta`)" if axis == "beta" else "KL target (`kl.target`, adaptive controller)"
    parts = [f"# Sweep report: `{sweep_dir}`", ""]
    if runs:
        parts += [f"Swept: {name}. {len(runs)} RL runs, {finished} finished. \"Final\" = mean over the last "
                  f"{window} logged steps; ± is the sample standard deviation over seeds. KL is k1 summed over the "
                  "response, in nats per sequence.", "", "## Summary", "", *[f"- {s}" for s in summary], ""]
        parts += ["## Mean ± std over seeds", "", group_table(groups, axis, gold) if groups else "No finished run.",
                  ""]
        parts += ["## Runs", "", run_table(rows, axis, gold), ""]
    if fit_lines:
        parts += ["## Frontier fits (Gao et al. 2022)", "",
                  f"d = sqrt(KL); gain = {'gold score' if gold else 'score'} minus its step-0 value (RL, per seed) "
                  "or its n = 1 value (best-of-n, per seed). RL: R(d) = d(α − β log d); best-of-n: "
                  "R(d) = d(α − β d); least squares through R(0) = 0.", "", *[f"- {s}" for s in fit_lines], ""]
    if bon:
        parts += ["Best-of-n (mean over seeds):", "",
                  markdown_table(["n", "KL (nats)", "d", "proxy", "gold", "gain"],
                                 [[r["n"], f"{r['kl']:.3f}", f"{r['d']:.3f}", f"{r['proxy']:.3f}",
                                   f"{r['gold']:.3f}", f"{r['gain']:+.3f}"] for r in bon]), ""]
    for title, img in images:
        parts += [f"### {title}", "", f"![{title}]({os.path.basename(img)})", ""]
    if section is not None:
        parts += section.markdown
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path

"""Direct alignment runs (scripts/train_dpo.py) in a sweep report, and the three-way comparison: RL, DPO and best-of-n
on one gold-vs-KL frontier.

A DPO job is any job folder whose ``.hydra/config.yaml`` has a ``dpo`` section. It is *finished* when its
``metrics.jsonl`` reaches step ``trainer.max_steps`` with a frontier measurement (``frontier/kl``, written by
rlhf.analysis.frontier at every evaluation) and ``final/`` holds the model.

Each method's points, as (KL in nats per sequence, gold gain over its starting policy):

    RL          per β: the mean over seeds of each run's final point (the last block of ``window`` logged steps:
                KL of its rollouts, gold minus the seed's step-0 gold), from rlhf.analysis.report.trajectories
    DPO         per (loss, β): the mean over seeds of the final frontier measurement (KL on its own samples of the
                held-out prompts, gold minus the same run's step-0 gold, where policy = reference)
    best-of-n   per n: the analytic KL log n - (n - 1) / n and the gold gain over n = 1, mean over seeds

``best_by_budget`` answers "which method reaches the highest gold gain at each KL budget": for every budget, each
method's best point with KL at most the budget. The per-method fits use Gao et al.'s forms: RL's d(α − β log d)
for RL and for DPO (Rafailov et al. 2024 fit direct alignment with the same form), d(α − β d) for best-of-n.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import yaml

from rlhf.analysis.report import (
    FrontierFit,
    Job,
    Trajectory,
    _figure,
    fit_frontier,
    frontier_curve,
    markdown_table,
    read_metrics,
)

METHODS = ("RL", "DPO", "best-of-n")


@dataclass(frozen=True)
class DirectRun(Job):
    """One DPO job of a sweep (scripts/train_dpo.py)."""

    @property
    def beta(self) -> float:
        return float(self.config["dpo"]["beta"])

    @property
    def loss(self) -> str:
        return str(self.config["dpo"]["loss"])

    def frontier_lines(self) -> list[dict]:
        """The metric lines with a frontier measurement, in step order."""
        return [m for m in self.metrics if math.isfinite(m.get("frontier/kl", math.nan))]


def load_direct_run(job_dir: str, sweep_dir: str) -> DirectRun:
    with open(os.path.join(job_dir, ".hydra", "config.yaml")) as f:
        config = yaml.safe_load(f)
    metrics = read_metrics(os.path.join(job_dir, "metrics.jsonl"))
    max_steps = int(config["trainer"]["max_steps"])
    last = [m for m in metrics if m["step"] == max_steps]
    if not metrics:
        finished, reason = False, "no metrics logged (crashed before the first step, or not started)"
    elif not last:
        finished, reason = False, f"logged up to step {int(metrics[-1]['step'])} of {max_steps}"
    elif not math.isfinite(last[0].get("frontier/kl", math.nan)):
        finished, reason = False, "no frontier measurement at the last step (frontier.num_prompts=0?)"
    elif not os.path.isfile(os.path.join(job_dir, "final", "config.json")):
        finished, reason = False, "no final/ model"
    else:
        finished, reason = True, ""
    return DirectRun(os.path.relpath(job_dir, sweep_dir), job_dir, config, metrics, finished, reason)


def direct_row(run: DirectRun) -> dict:
    """One CSV row: loss, β, seed, status and the final frontier point (KL, its standard error, gold, the step-0
    gold, their difference) and held-out preference accuracy."""
    lines = run.frontier_lines()
    first, last = (lines[0], lines[-1]) if lines else ({}, {})
    nan = math.nan
    gold, start = last.get("frontier/gold_score", nan), first.get("frontier/gold_score", nan)
    return {"loss": run.loss, "beta": run.beta, "seed": run.seed,
            "status": "finished" if run.finished else "unfinished",
            "kl": last.get("frontier/kl", nan), "kl_se": last.get("frontier/kl_se", nan), "gold": gold,
            "gold_se": last.get("frontier/gold_se", nan), "start_gold": start,
            "gain": gold - start if first.get("step") == 0 else nan,
            "accuracy": last.get("eval/rewards/accuracy", nan), "job": run.name, "reason": run.reason}


def direct_trajectories(runs: Sequence[DirectRun]) -> list[Trajectory]:
    """Each finished run's frontier measurements after step 0 as (d = sqrt(KL), gold gain over step 0); the value is
    its β."""
    out = []
    for r in runs:
        lines = r.frontier_lines()
        if not r.finished or not lines or lines[0]["step"] != 0 or "frontier/gold_score" not in lines[0]:
            continue
        later = lines[1:]
        d = np.sqrt(np.clip([m["frontier/kl"] for m in later], 0.0, None))
        gain = np.array([m.get("frontier/gold_score", math.nan) - lines[0]["frontier/gold_score"] for m in later])
        out.append(Trajectory(r, r.beta, d, gain))
    return out


class MethodPoint(NamedTuple):
    """One setting of one method on the frontier: mean KL and gold gain over its seeds."""

    method: str      # one of METHODS
    setting: str     # "β = 0.1", "sigmoid β = 0.1", "n = 16"
    kl: float
    gain: float
    seeds: int


def mean_points(method: str, items: Sequence[tuple[str, float, float]]) -> list[MethodPoint]:
    """``(setting, kl, gain)`` of single runs -> one MethodPoint per setting (means over its runs), in first-seen
    order; items with a non-finite KL or gain are left out."""
    by: dict[str, list[tuple[float, float]]] = {}
    for setting, kl, gain in items:
        if math.isfinite(kl) and math.isfinite(gain):
            by.setdefault(setting, []).append((kl, gain))
    return [MethodPoint(method, s, float(np.mean([k for k, _ in v])), float(np.mean([g for _, g in v])), len(v))
            for s, v in by.items()]


def rl_points(trajs: Sequence[Trajectory], axis: str = "beta") -> list[MethodPoint]:
    """RL's final points per swept value from its trajectories (the last block's d^2 and gain)."""
    name = "β" if axis == "beta" else "KL target"
    items = [(f"{name} = {t.value:g}", float(t.d[-1] ** 2), float(t.gain[-1])) for t in trajs if t.d.size]
    return mean_points("RL", items)


def dpo_points(rows: Sequence[dict]) -> list[MethodPoint]:
    """DPO's final points per (loss, β) from ``direct_row`` rows (finished ones)."""
    items = [(f"{r['loss']} β = {r['beta']:g}", r["kl"], r["gain"]) for r in rows if r["status"] == "finished"]
    return mean_points("DPO", items)


def bon_points(bon: Sequence[dict]) -> list[MethodPoint]:
    """Best-of-n's points from ``rlhf.analysis.best_of_n.mean_over_seeds`` rows."""
    return [MethodPoint("best-of-n", f"n = {int(r['n'])}", float(r["kl"]), float(r["gain"]), int(r.get("seeds", 1)))
            for r in bon]


def default_budgets(points: Sequence[MethodPoint]) -> list[float]:
    """KL budgets 0.5, 1, 2, 4, ... nats, up to the first one at or above the largest point's KL."""
    top = max([p.kl for p in points] + [0.5])
    budgets = [0.5]
    while budgets[-1] < top:
        budgets.append(budgets[-1] * 2)
    return budgets


def best_by_budget(points: Sequence[MethodPoint], budgets: Sequence[float]) -> list[dict]:
    """Per budget: ``budget``, for each method in ``METHODS`` its best point with KL <= budget (or None), and the
    ``winner`` (the method with the largest gain; None when no method has a point within the budget)."""
    out = []
    for b in budgets:
        row: dict = {"budget": float(b)}
        for m in METHODS:
            within = [p for p in points if p.method == m and p.kl <= b]
            row[m] = max(within, key=lambda p: p.gain) if within else None
        best = [row[m] for m in METHODS if row[m] is not None]
        row["winner"] = max(best, key=lambda p: p.gain).method if best else None
        out.append(row)
    return out


def budget_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per budget, each method's best gain (its setting and KL) and the winner."""
    def cell(p: MethodPoint | None) -> str:
        return "—" if p is None else f"{p.gain:+.3f} ({p.setting}, KL {p.kl:.2f})"

    return markdown_table(["KL budget (nats)", *[f"{m}: best gold gain" for m in METHODS], "highest"],
                          [[f"{r['budget']:g}", *[cell(r[m]) for m in METHODS], r["winner"] or "—"] for r in rows])


def direct_run_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per DPO run."""
    def c(x: float, digits: int = 3) -> str:
        return f"{x:.{digits}f}" if math.isfinite(x) else "—"

    return markdown_table(["loss", "β", "seed", "status", "KL (nats)", "gold", "start gold", "gain",
                           "pref. accuracy", "job"],
                          [[r["loss"], f"{r['beta']:g}", r["seed"], r["status"], f"{c(r['kl'], 2)} ± {c(r['kl_se'], 2)}",
                            f"{c(r['gold'])} ± {c(r['gold_se'])}", c(r["start_gold"]), c(r["gain"]), c(r["accuracy"]),
                            f"`{r['job']}`"] for r in rows])


def method_fits(rl: Sequence[Trajectory], dpo: Sequence[Trajectory],
                bon: Sequence[dict] | None) -> dict[str, FrontierFit]:
    """Each method's Gao-style fit over its points (RL and DPO: every trajectory point; best-of-n: every n), for
    the methods with at least 2 points."""
    fits = {}
    for method, trajs in (("RL", rl), ("DPO", dpo)):
        d = np.concatenate([t.d for t in trajs]) if trajs else np.zeros(0)
        if d.size >= 2:
            fits[method] = fit_frontier(d, np.concatenate([t.gain for t in trajs]), "rl")
    if bon and len(bon) >= 2:
        fits["best-of-n"] = fit_frontier([r["d"] for r in bon], [r["gain"] for r in bon], "bon")
    return fits


STYLE = {"RL": ("tab:blue", "o"), "DPO": ("tab:orange", "D"), "best-of-n": ("black", "s")}


def plot_methods(rl: Sequence[Trajectory], dpo: Sequence[Trajectory], bon: Sequence[dict] | None,
                 fits: dict[str, FrontierFit], path: str, metric: str = "gold_score") -> str:
    """Gold gain against d = sqrt(KL) for the three methods on one plot: RL and DPO trajectories (thin) and final
    points (one marker per run), best-of-n's points, and each method's fit."""
    fig, axes = _figure(size=(7.2, 5.0))
    ax = axes[0, 0]
    ds = [0.5]
    for method, trajs in (("RL", rl), ("DPO", dpo)):
        colour, marker = STYLE[method]
        for i, t in enumerate(trajs):
            ax.plot(t.d, t.gain, "-", color=colour, lw=0.7, alpha=0.35)
            ax.scatter(t.d[-1:], t.gain[-1:], s=45, marker=marker, color=colour, edgecolor="black", linewidth=0.5,
                       zorder=3, label=f"{method} final, one per run" if i == 0 else None)
            ds += list(t.d)
    if bon:
        colour, marker = STYLE["best-of-n"]
        ax.scatter([r["d"] for r in bon], [r["gain"] for r in bon], s=40, marker=marker, color=colour, zorder=4,
                   label=f"best-of-n, n = 1 … {max(int(r['n']) for r in bon)}")
        ds += [r["d"] for r in bon]
    grid = np.linspace(0.0, max(ds) * 1.05, 200)
    for method, fit in fits.items():
        colour, _ = STYLE[method]
        form = "d(α − β log d)" if fit.form == "rl" else "d(α − β d)"
        # best-of-n's parabola is drawn a little past its largest n only: beyond, it is an extrapolation that dives
        x = grid[grid <= max(r["d"] for r in bon) * 1.5] if method == "best-of-n" else grid
        ax.plot(x, frontier_curve(x, fit), color=colour, lw=1.8, ls="--" if method == "best-of-n" else "-",
                label=f"{method} fit {form}: α={fit.alpha:.3f}, β={fit.beta:.3f}, R²={fit.r2:.2f}")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("d = sqrt(KL(π ‖ π_ref)), sqrt(nats per sequence)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} gain over the starting policy")
    ax.set_title("RL, DPO and best-of-n on one gold-vs-KL frontier")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=120)
    return path


def budget_verdict(rows: Sequence[dict]) -> str:
    """One sentence: which method has the highest gold gain at each budget, grouped into runs of budgets."""
    spans: list[list] = []
    for r in rows:
        if r["winner"] is None:
            continue
        if spans and spans[-1][0] == r["winner"]:
            spans[-1][2] = r["budget"]
        else:
            spans.append([r["winner"], r["budget"], r["budget"]])
    if not spans:
        return "No method has a point within any KL budget."
    parts = [f"{m} for budgets {lo:g}–{hi:g} nats" if lo != hi else f"{m} at {lo:g} nats" for m, lo, hi in spans]
    return "Highest measured gold gain within each KL budget: " + "; ".join(parts) + "."


class Section(NamedTuple):
    """The DPO part of a sweep report."""

    lines: list[str]       # summary sentences (printed, and in report.md)
    markdown: list[str]    # report.md lines
    files: list[str]       # dpo.csv, methods.png
    rows: list[dict]       # one per DPO run


def direct_section(runs: Sequence[DirectRun], rl: Sequence[Trajectory], bon: Sequence[dict] | None, out_dir: str,
                   axis: str = "beta", kl_budget: float | None = None) -> Section:
    """Write dpo.csv and methods.png for the sweep's DPO ``runs`` beside the RL trajectories ``rl`` (gold gains; empty
    for none) and best-of-n's rows ``bon``; return the summary lines and report.md section."""
    from rlhf.analysis.report import _fit_line, write_csv

    rows = [direct_row(r) for r in runs]
    files = [write_csv(rows, os.path.join(out_dir, "dpo.csv"))]
    dpo = direct_trajectories(runs)
    points = rl_points(rl, axis) + dpo_points(rows) + bon_points(bon or [])
    budgets = sorted(set(default_budgets(points)) | ({kl_budget} if kl_budget is not None else set()))
    by_budget = best_by_budget(points, budgets)
    fits = method_fits(rl, dpo, bon)
    unfinished = [r for r in rows if r["status"] != "finished"]
    # RL's and best-of-n's fits are in the report's own lines already
    lines = [_fit_line("DPO", fits["DPO"], f"{len(dpo)} runs x their evaluations after step 0")] if "DPO" in fits \
        else []
    lines.append(budget_verdict(by_budget))
    if unfinished:
        lines.append(f"{len(unfinished)} of {len(rows)} DPO runs are unfinished and left out: "
                     + "; ".join(f"{r['job']} ({r['reason']})" for r in unfinished) + ".")
    md = ["## DPO beside RL and best-of-n", "",
          "DPO's KL is measured on its own samples of held-out prompts after training (rlhf.analysis.frontier: summed "
          "k1 to the reference, the estimator RL logs on its rollouts), its gain against the same run's step-0 "
          "samples (the reference's). Points per setting are means over seeds.", "",
          *[f"- {s}" for s in lines], "", "### DPO runs", "", direct_run_table(rows), "",
          "### The highest gold gain at each KL budget", "", budget_table(by_budget), ""]
    if points:
        path = plot_methods(rl, dpo, bon, fits, os.path.join(out_dir, "methods.png"))
        files.append(path)
        md += ["### RL, DPO and best-of-n on one frontier", "", f"![RL, DPO and best-of-n]({os.path.basename(path)})", ""]
    return Section(lines, md, files, rows)

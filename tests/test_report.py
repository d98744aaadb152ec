import csv
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import yaml

from rlhf.analysis.report import (
    best_lines,
    block_means,
    collect_runs,
    final_residuals,
    final_value,
    fit_frontier,
    frontier_curve,
    frontier_verdict,
    group_rows,
    kl_monotone,
    no_kl_note,
    read_metrics,
    run_row,
    runs_without_kl,
    start_values,
    trajectories,
    write_report,
)
from tests.conftest import FAST, ROOT, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("form, truth", [("rl", lambda d: d * (0.8 - 0.3 * np.log(d))),
                                         ("bon", lambda d: d * (1.3 - 0.25 * d))])
def test_fit_recovers_known_alpha_beta_from_noisy_points(form, truth):
    rng = np.random.default_rng(0)
    d = np.linspace(0.1, 4.0, 60)
    gain = truth(d) + rng.normal(0.0, 0.01, d.size)
    fit = fit_frontier(d, gain, form)
    alpha, beta = (0.8, 0.3) if form == "rl" else (1.3, 0.25)
    # noise sd 0.01 over 60 points: the parameters' standard errors are ~0.005, so 0.03 is > 5 sigma
    assert fit.alpha == pytest.approx(alpha, abs=0.03)
    assert fit.beta == pytest.approx(beta, abs=0.03)
    assert fit.r2 > 0.99
    assert fit.n == 60


def test_rl_fit_through_two_points_is_exact():
    # R(d) = d (alpha - beta log d). At d = 1: R = alpha. At d = e: R = e (alpha - beta).
    # With R(1) = 0.5 and R(e) = e * 0.3: alpha = 0.5, beta = 0.5 - 0.3 = 0.2.
    fit = fit_frontier([1.0, math.e], [0.5, math.e * 0.3], "rl")
    assert fit.alpha == pytest.approx(0.5)
    assert fit.beta == pytest.approx(0.2)
    assert frontier_curve([2.0], fit)[0] == pytest.approx(2.0 * (0.5 - 0.2 * math.log(2.0)))


def test_bon_fit_matches_the_normal_equations_and_r2_by_hand():
    d = [1.0, 2.0, 3.0]
    y = [1.0, 1.0, 0.0]
    fit = fit_frontier(d, y, "bon")
    # Features x1 = d, x2 = -d^2. Normal equations A [alpha, beta] = b:
    # A = [[sum d^2, -sum d^3], [-sum d^3, sum d^4]] = [[14, -36], [-36, 98]]; b = [sum d y, -sum d^2 y] = [3, -5]
    # det = 14*98 - 36^2 = 76; alpha = (98*3 - 36*5) / 76 = 114/76 = 1.5; beta = (14*(-5) + 36*3) / 76 = 38/76 = 0.5
    assert fit.alpha == pytest.approx(1.5)
    assert fit.beta == pytest.approx(0.5)
    # predictions d(1.5 - 0.5 d) = [1, 1, 0]: a perfect fit, R^2 = 1
    assert fit.r2 == pytest.approx(1.0)
    # With y[2] = 0.5 the form no longer fits exactly; R^2 from a plain loop over the fitted predictions
    y2 = [1.0, 1.0, 0.5]
    fit2 = fit_frontier(d, y2, "bon")
    pred = [x * (fit2.alpha - fit2.beta * x) for x in d]
    mean = sum(y2) / 3
    r2 = 1 - sum((a - b) ** 2 for a, b in zip(y2, pred)) / sum((a - mean) ** 2 for a in y2)
    assert fit2.r2 == pytest.approx(r2)
    assert fit2.r2 < 1.0


def test_the_two_forms_differ():
    # BoN-shaped data is not exactly RL-shaped: a wrong feature map would fit both perfectly.
    d = np.linspace(0.2, 3.0, 20)
    gain = d * (1.0 - 0.3 * d)
    assert fit_frontier(d, gain, "bon").r2 == pytest.approx(1.0)
    assert fit_frontier(d, gain, "rl").r2 < 0.999


def test_fit_rejects_bad_points():
    with pytest.raises(ValueError, match="d must be >= 0"):
        fit_frontier([-1.0, 1.0], [0.0, 1.0], "rl")
    with pytest.raises(ValueError, match="one length"):
        fit_frontier([1.0, 2.0], [0.0], "rl")
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_frontier([1.0], [1.0], "bon")
    with pytest.raises(KeyError, match="valid names: bon, rl"):
        fit_frontier([1.0, 2.0], [1.0, 2.0], "ppo")


# ------------------------------------------------------------------------------------------------ tables
def test_block_means_end_at_the_last_value():
    # [1..7] in blocks of 3, aligned to the end: the leading 1 is dropped, blocks [2,3,4] and [5,6,7]
    assert block_means(np.arange(1, 8), 3).tolist() == [3.0, 6.0]
    assert block_means(np.arange(2), 3).size == 0


def test_final_value_is_the_mean_of_the_last_window_ignoring_nan():
    metrics = [{"step": i, "score": float(i)} for i in range(4)] + [{"step": 4, "score": math.nan}]
    # last 3 rows: 2, 3, nan -> mean of [2, 3] = 2.5
    assert final_value(metrics, "score", 3) == pytest.approx(2.5)
    assert math.isnan(final_value(metrics, "gold_score", 3))


def test_read_metrics_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "kl": null, "score": 1.0}\n{"step": 1, "score": 2.0}\n{"step": 2, "sco')
    rows = read_metrics(str(path))
    assert [r["step"] for r in rows] == [0, 1]
    assert math.isnan(rows[0]["kl"])  # JSON null (a NaN at log time) reads back as nan
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(str(path))


def test_group_rows_mean_and_sample_std():
    rows = [{"beta": 0.1, "status": "finished", "score": 1.0, "kl": 2.0, "reward": 0.0, "gold_score": math.nan,
             "final_beta": 0.1},
            {"beta": 0.1, "status": "finished", "score": 3.0, "kl": 4.0, "reward": 0.0, "gold_score": math.nan,
             "final_beta": 0.1},
            {"beta": 0.0, "status": "unfinished", "score": 9.0, "kl": 9.0, "reward": 0.0, "gold_score": 1.0,
             "final_beta": 0.0}]
    groups = group_rows(rows, "beta")
    assert len(groups) == 1 and groups[0]["n"] == 2  # the unfinished run is not averaged
    # scores [1, 3]: mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    assert groups[0]["score_mean"] == pytest.approx(2.0)
    assert groups[0]["score_std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(groups[0]["gold_score_mean"])


def _group(beta, score, kl, gold=math.nan):
    return {"beta": beta, "n": 2, "score_mean": score, "score_std": 0.0, "kl_mean": kl, "kl_std": 0.0,
            "gold_score_mean": gold, "gold_score_std": 0.0, "reward_mean": 0.0, "reward_std": 0.0}


def test_best_lines_name_the_best_gold_and_the_best_score_within_budget():
    groups = [_group(0.0, 0.9, 30.0, gold=0.1), _group(0.1, 0.6, 8.0, gold=0.5), _group(0.3, 0.2, 4.0, gold=0.3)]
    lines = best_lines(groups, "beta", gold=True, kl_budget=5.0)
    assert lines[0].startswith("Best gold score: β = 0.1 ")  # gold 0.5 beats 0.3 and 0.1
    assert lines[1].startswith("Best score with mean final KL <= 5 nats: β = 0.3 ")  # only KL 4 fits
    lines = best_lines(groups, "beta", gold=False, kl_budget=1.0)
    assert lines[0].startswith("Best score: β = 0 ")  # score 0.9
    assert lines[1].startswith("No β stays within a KL budget of 1 nats; the lowest mean final KL is 4.00")


def test_kl_monotone():
    assert kl_monotone([_group(0, 0, 30.0), _group(0.1, 0, 8.0), _group(0.3, 0, 4.0)])
    assert not kl_monotone([_group(0, 0, 30.0), _group(0.1, 0, 3.0), _group(0.3, 0, 4.0)])  # 3 < 4
    assert not kl_monotone([_group(0, 0, 30.0)])  # one point orders nothing
    # a KL-target sweep: KL should grow with the target
    assert kl_monotone([_group(2, 0, 2.5), _group(4, 0, 4.1)], decreasing=False)
    assert not kl_monotone([_group(2, 0, 2.5), _group(4, 0, 4.1)])


def test_frontier_verdict_compares_residuals_with_the_seed_spread():
    # Four deviations of 0.01 from their group means, 2 degrees of freedom: pooled sd = sqrt(4e-4 / 2) = 0.01414,
    # and the standard error of a 2-seed mean is 0.01414 / sqrt(2) = 0.01, so 2 SE = 0.02.
    same = frontier_verdict({0.0: [0.01, -0.01], 0.1: [0.0, 0.02]}, "beta")  # means 0 and 0.01: within 0.02
    assert same.startswith("Every β's runs end on one shared frontier")
    moved = frontier_verdict({0.0: [0.01, -0.01], 0.1: [0.5, 0.52]}, "beta")  # mean 0.51 >> 0.02
    assert moved.startswith("The KL setting moves the frontier")
    assert "above it for β = 0.1" in moved and "below" not in moved
    assert frontier_verdict({0.0: [0.1], 0.1: [0.3]}, "beta").startswith("Undecided")


# ------------------------------------------------------------------------------------------------ job folders
def _fake_job(root, name, beta, seed, steps, max_steps, checkpoint=True, kl=lambda i: float(i), gold=True,
              kl_cfg=None):
    """A job folder as train_policy.py writes it. ``kl=None`` logs ``"kl": null`` as the trainer does when it
    loads no reference (beta = 0 with kl.log_at_zero_beta off), with reward = score; ``kl_cfg`` adds to the
    config's ``kl`` section."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "run_dir": "${hydra:runtime.output_dir}",
           "kl": {"beta": beta, "controller": "fixed", "target": 6.0, **(kl_cfg or {})},
           "trainer": {"max_steps": max_steps}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(job / "metrics.jsonl", "w") as f:
        for i in range(steps):
            k = None if kl is None else kl(i)
            row = {"step": i, "score": 0.1 * i, "kl": k, "beta": beta,
                   "reward": 0.1 * i - (0.0 if k is None else beta * k)}
            if gold:
                row["gold_score"] = 0.05 * i
            f.write(json.dumps(row) + "\n")
    if checkpoint:
        ck = job / "checkpoints" / f"step_{max_steps}"
        ck.mkdir(parents=True)
        (ck / "COMPLETE").write_text(str(max_steps))
    return job


def test_collect_runs_lists_unfinished_runs_with_a_reason(tmp_path):
    _fake_job(tmp_path, "0_beta=0_seed=0", 0.0, 0, 5, 5)
    _fake_job(tmp_path, "1_beta=0.1_seed=0", 0.1, 0, 3, 5, checkpoint=False)
    _fake_job(tmp_path, "10_beta=0.3_seed=0", 0.3, 0, 0, 5, checkpoint=False)
    _fake_job(tmp_path, "2_beta=0.3_seed=1", 0.3, 1, 5, 5)
    runs = collect_runs(str(tmp_path))
    assert [r.name for r in runs] == ["0_beta=0_seed=0", "1_beta=0.1_seed=0", "2_beta=0.3_seed=1",
                                      "10_beta=0.3_seed=0"]  # Hydra's job order, not string order
    assert [r.finished for r in runs] == [True, False, True, False]
    assert runs[1].reason == "logged 3 of 5 steps, no complete checkpoints/step_5"
    assert runs[3].reason.startswith("no metrics logged")
    row = run_row(runs[0], "beta", window=2)
    # steps 3 and 4: score (0.3 + 0.4) / 2 = 0.35, kl (3 + 4) / 2 = 3.5, gold (0.15 + 0.2) / 2 = 0.175
    assert (row["score"], row["kl"], row["gold_score"]) == pytest.approx((0.35, 3.5, 0.175))
    assert (row["steps"], row["status"]) == (5, "finished")


def test_trajectories_and_residuals(tmp_path):
    _fake_job(tmp_path, "0", 0.0, 0, 4, 4, kl=lambda i: float(i * i))
    _fake_job(tmp_path, "1", 0.1, 0, 4, 4, kl=lambda i: float(i))
    _fake_job(tmp_path, "2", 0.1, 1, 4, 4, kl=lambda i: float(i), checkpoint=False)
    runs = collect_runs(str(tmp_path))
    assert start_values(runs, "gold_score") == {0: 0.0, 1: 0.0}  # gold at step 0 is 0.05 * 0
    trajs = trajectories(runs, "beta", "gold_score", window=2)
    assert len(trajs) == 2  # the unfinished run has no trajectory
    # run "0": blocks of 2 steps, kl [0, 1] -> 0.5, [4, 9] -> 6.5; gold [0, 0.05] -> 0.025, [0.1, 0.15] -> 0.125
    assert trajs[0].d.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(6.5)])
    assert trajs[0].gain.tolist() == pytest.approx([0.025, 0.125])
    fit = fit_frontier(np.concatenate([t.d for t in trajs]), np.concatenate([t.gain for t in trajs]), "rl")
    res = final_residuals(trajs, fit)
    assert sorted(res) == [0.0, 0.1]
    assert res[0.0][0] == pytest.approx(0.125 - frontier_curve([math.sqrt(6.5)], fit)[0])


# ---------------------------------------------------------------------------------------- beta = 0 without KL
NOTE = ("note: 0_beta=0_seed=0 (beta=0) logged no KL: it ran with kl.log_at_zero_beta=false, so it is not on "
        "the frontier; rerun it with kl.log_at_zero_beta=true")


def _plain_sweep(root, zero_logs_kl):
    """What ``train_policy.py -m kl.beta=0,0.1,0.3 seed=0,1`` leaves, 6 steps a job. With ``zero_logs_kl``
    False the beta = 0 job of seed 0 ran with kl.log_at_zero_beta=false and logged ``"kl": null``, and its
    seed-1 twin ran with the flag on (so the beta = 0 setting keeps one KL); the other jobs logged KL."""
    _fake_job(root, "0_beta=0_seed=0", 0.0, 0, 6, 6, kl=(lambda i: 2.0 * i) if zero_logs_kl else None,
              kl_cfg={"log_at_zero_beta": zero_logs_kl})
    _fake_job(root, "1_beta=0_seed=1", 0.0, 1, 6, 6, kl=lambda i: 2.0 * i, kl_cfg={"log_at_zero_beta": True})
    for n, (beta, scale) in enumerate([(0.1, 1.0), (0.3, 0.4)]):
        for seed in (0, 1):
            _fake_job(root, f"{2 + 2 * n + seed}_beta={beta}_seed={seed}", beta, seed, 6, 6,
                      kl=lambda i, c=scale * (1.0 + 0.2 * seed): c * i, kl_cfg={"log_at_zero_beta": False})
    return root


def _report(sweep, out, capsys, *extra):
    _load_script("report").main([str(sweep), "--out", str(out), "--window", "2", *extra])
    return capsys.readouterr().out


def test_report_keeps_a_beta0_run_without_kl_marks_it_and_leaves_it_off_the_frontier(tmp_path, capsys):
    sweep = _plain_sweep(tmp_path / "sweep", zero_logs_kl=False)
    out = tmp_path / "report"
    stdout = _report(sweep, out, capsys, "--kl-budget", "1")
    md = (out / "report.md").read_text()
    # one note line, in stdout and in report.md, naming the run and the flag
    for text, prefix in ((stdout, ""), (md, "- ")):
        lines = [line for line in text.splitlines() if "0_beta=0_seed=0" in line and "KL" in line]
        assert lines == [prefix + NOTE]
        assert text.count("logged no KL:") == 1  # its seed-1 twin logged KL: no note for it
    # kept in the tables with its scores (last 2 steps: score (0.4 + 0.5) / 2, gold half that, reward = score)
    rows = _read_csv(out / "report.csv")
    assert [r["job"] for r in rows] == ["0_beta=0_seed=0", "1_beta=0_seed=1", "2_beta=0.1_seed=0",
                                        "3_beta=0.1_seed=1", "4_beta=0.3_seed=0", "5_beta=0.3_seed=1"]
    assert rows[0]["kl"] == "n/a" and rows[0]["status"] == "finished"
    assert (float(rows[0]["score"]), float(rows[0]["gold_score"]), float(rows[0]["reward"])) == \
        pytest.approx((0.45, 0.225, 0.45))
    assert float(rows[1]["kl"]) == pytest.approx(9.0)  # 2 * (4 + 5) / 2
    assert "| 0 | 0 | finished | 6/6 | 0.450 | n/a | 0.450 | 0.225 | `0_beta=0_seed=0` |" in md
    assert "| 0 | 1 | finished | 6/6 | 0.450 | 9.00 | 0.450 | 0.225 | `1_beta=0_seed=1` |" in md
    # beta = 0 keeps a mean KL, from seed 1 only: 9; beta = 0.1: (4.5 + 5.4) / 2; beta = 0.3: (1.8 + 2.16) / 2
    assert "Mean final KL decreases monotonically as β grows (9.00, 4.95, 1.98 nats)." in stdout
    assert "the lowest mean final KL is 1.98 at β = 0.3." in stdout
    # the fits use the 5 runs with KL: 3 blocks of 2 steps each
    runs = collect_runs(str(sweep))
    assert [r.name for r in runs_without_kl(runs)] == ["0_beta=0_seed=0"]
    trajs = trajectories(runs, "beta", "gold_score", window=2)
    assert "0_beta=0_seed=0" not in [t.run.name for t in trajs] and len(trajs) == 5
    assert "RL fit: α = " in stdout and "(15 points: 5 runs x block means of 2 steps)." in stdout
    for name in ("frontier.png", "curves.png", "overoptimisation.png", "frontier_fit.png"):
        _assert_png(out / name)


def test_report_without_kl_for_a_whole_setting(tmp_path, capsys):
    sweep = _plain_sweep(tmp_path / "sweep", zero_logs_kl=False)
    shutil.rmtree(sweep / "1_beta=0_seed=1")  # now no beta = 0 run has KL
    out = tmp_path / "report"
    stdout = _report(sweep, out, capsys, "--kl-budget", "1")
    assert stdout.splitlines()[0] == NOTE
    assert "| 0 | 1 | 0.450 | n/a | 0.450 | 0.225 |" in (out / "report.md").read_text()  # the group table
    assert "Best gold score: β = 0 (gold_score 0.225, no KL logged, 1 seeds)." in stdout
    assert "Mean final KL decreases monotonically as β grows (4.95, 1.98 nats, settings without KL left " \
        "out)." in stdout
    assert "(12 points: 4 runs x block means of 2 steps)." in stdout
    _assert_png(out / "frontier.png")


def test_report_when_no_run_logged_kl(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"{seed}_beta=0_seed={seed}", 0.0, seed, 6, 6, kl=None,
                  kl_cfg={"log_at_zero_beta": False})
    out = tmp_path / "report"
    stdout = _report(sweep, out, capsys, "--kl-budget", "5")
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert notes == [NOTE, NOTE.replace("0_beta=0_seed=0", "1_beta=0_seed=1")]
    assert "No run logged KL: the tables list scores only, with no frontier plot or fit." in stdout
    assert "No β logged KL, so the KL budget of 5 nats cannot be checked." in stdout
    assert [r["kl"] for r in _read_csv(out / "report.csv")] == ["n/a", "n/a"]
    md = (out / "report.md").read_text()
    assert "| 0 | 2 | 0.450 ± 0.000 | n/a | 0.450 ± 0.000 | 0.225 ± 0.000 |" in md
    assert "| 0 | 1 | finished | 6/6 | 0.450 | n/a | 0.450 | 0.225 | `1_beta=0_seed=1` |" in md
    assert "RL fit" not in md
    assert not (out / "frontier.png").exists() and not (out / "frontier_fit.png").exists()
    _assert_png(out / "curves.png")


def test_report_gives_no_note_when_beta0_logged_kl(tmp_path, capsys):
    sweep = _plain_sweep(tmp_path / "sweep", zero_logs_kl=True)
    out = tmp_path / "report"
    stdout = _report(sweep, out, capsys)
    md = (out / "report.md").read_text()
    assert "note:" not in stdout and "note:" not in md and "n/a" not in md
    assert float(_read_csv(out / "report.csv")[0]["kl"]) == pytest.approx(9.0)
    assert "(18 points: 6 runs x block means of 2 steps)." in stdout


@pytest.mark.parametrize("kl_cfg, says", [
    ({"log_at_zero_beta": False}, "kl.log_at_zero_beta=false,"),
    ({}, "kl.log_at_zero_beta=false,"),  # a config written before the flag existed
    ({"log_at_zero_beta": None}, "kl.log_at_zero_beta=null (auto)"),  # "auto" outside a multirun
])
def test_no_kl_note_names_the_flag_as_configured(tmp_path, kl_cfg, says):
    _fake_job(tmp_path, "7_beta=0_seed=3", 0.0, 3, 2, 2, kl=None, kl_cfg=kl_cfg)
    note = no_kl_note(collect_runs(str(tmp_path))[0])
    assert note.startswith("note: 7_beta=0_seed=3 (beta=0) logged no KL: it ran with ") and says in note
    assert note.endswith("rerun it with kl.log_at_zero_beta=true")


# ------------------------------------------------------------------------------------------------ a real sweep
TINY = [o for o in FAST if not o.startswith("logging.progress")]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A real 2-job multirun of scripts/train_policy.py (3 steps each), made once for this module."""
    sweep = tmp_path_factory.mktemp("sweep") / "beta"
    proc = run_script(["scripts/train_policy.py", "-m", "+sweep=beta", "hydra/launcher=basic", "kl.beta=0,0.1",
                       "seed=0", "trainer.max_steps=3", *TINY, f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 300


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_on_a_real_multirun(tiny_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    _load_script("report").main([str(tiny_sweep), "--out", str(out), "--window", "1", "--kl-budget", "100"])
    stdout = capsys.readouterr().out
    for name in ("report.csv", "report.md", "frontier.png", "curves.png", "overoptimisation.png",
                 "frontier_fit.png"):
        assert (out / name).is_file(), name
    for name in ("frontier.png", "curves.png", "overoptimisation.png", "frontier_fit.png"):
        _assert_png(out / name)
    rows = _read_csv(out / "report.csv")
    assert [(float(r["beta"]), int(r["seed"]), r["status"], int(r["steps"])) for r in rows] == \
        [(0.0, 0, "finished", 3), (0.1, 0, "finished", 3)]
    # --window 1: final = the last logged step, read straight from each job's metrics.jsonl
    for r in rows:
        last = read_metrics(os.path.join(tiny_sweep, r["job"], "metrics.jsonl"))[-1]
        assert float(r["score"]) == pytest.approx(last["score"])
        assert float(r["kl"]) == pytest.approx(last["kl"])  # beta = 0 has a KL: the sweep logs it
        assert float(r["gold_score"]) == pytest.approx(last["gold_score"])
    md = (out / "report.md").read_text()
    assert "| β | seeds | final score |" in md and "![Reward-KL frontier](frontier.png)" in md
    assert "Best gold score: β = " in stdout and "RL fit: α = " in stdout


def test_report_lists_an_unfinished_run(tiny_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep)
    job = next(p for p in sorted(sweep.iterdir()) if p.name.startswith("1_"))
    shutil.rmtree(job / "checkpoints" / "step_3")
    lines = (job / "metrics.jsonl").read_text().splitlines(keepends=True)
    (job / "metrics.jsonl").write_text("".join(lines[:2]))
    report = write_report(str(sweep), str(tmp_path / "out"), window=1)
    assert [r.finished for r in report.runs] == [True, False]
    rows = _read_csv(tmp_path / "out" / "report.csv")
    assert [r["status"] for r in rows] == ["finished", "unfinished"]
    assert rows[1]["reason"] == "logged 2 of 3 steps, no complete checkpoints/step_3"
    assert [g["beta"] for g in report.groups] == [0.0]  # only the finished run is averaged
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{job.name} (logged 2 of 3 steps" in md
    assert "| 0.1 | 0 | unfinished | 2/3 |" in md

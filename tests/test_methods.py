"""DPO in the sweep report (rlhf.analysis.methods): DPO jobs told apart from RL jobs, their final frontier points
and gains, the per-method means, the best method at each KL budget by hand, and the report files on fake and real
sweeps (a real DPO multirun of scripts/train_dpo.py)."""

import csv
import json
import math

import pytest
import yaml

from rlhf.analysis.best_of_n import bon_kl, write_bon_csv
from rlhf.analysis.methods import (
    MethodPoint,
    best_by_budget,
    budget_verdict,
    default_budgets,
    direct_row,
    load_direct_run,
    mean_points,
)
from rlhf.analysis.report import collect_jobs, write_report
from rlhf.config import ConfigError
from tests.conftest import run_script
from tests.test_report import _assert_png, _fake_job, _read_csv


def _fake_dpo_job(root, name, beta, seed, golds, kls, max_steps=4, final=True, loss="sigmoid"):
    """A job folder as train_dpo.py writes it: frontier/* on evaluation lines at steps 0, 2, ..., max_steps
    (``golds``/``kls`` one value per evaluation) and final/config.json."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "run_dir": "${hydra:runtime.output_dir}", "dpo": {"beta": beta, "loss": loss},
           "trainer": {"max_steps": max_steps}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(job / "metrics.jsonl", "w") as f:
        for i, (g, k) in enumerate(zip(golds, kls)):
            f.write(json.dumps({"step": 2 * i, "eval/rewards/accuracy": 0.5 + 0.1 * i, "frontier/kl": k,
                                "frontier/kl_se": 0.1, "frontier/gold_score": g, "frontier/gold_se": 0.01}) + "\n")
    if final:
        (job / "final").mkdir()
        (job / "final" / "config.json").write_text("{}")
    return job


def test_dpo_jobs_are_told_apart_and_their_final_point_is_read(tmp_path):
    _fake_job(tmp_path, "rl/0_beta=0.1_seed=0", 0.1, 0, 4, 4)
    _fake_dpo_job(tmp_path, "dpo/0_dpo_beta=0.1_seed=0", 0.1, 0, [-1.0, -0.5, -0.2], [0.0, 2.0, 3.0])
    _fake_dpo_job(tmp_path, "dpo/1_dpo_beta=0.3_seed=0", 0.3, 0, [-1.0, -0.9], [0.0, 0.5])  # stopped at step 2
    _fake_dpo_job(tmp_path, "dpo/2_dpo_beta=1_seed=0", 1.0, 0, [-1.0, -0.9, -0.8], [0.0, 0.5, 0.6], final=False)
    (tmp_path / "reward" / ".hydra").mkdir(parents=True)  # a reward stage's folder: neither kind, left out
    (tmp_path / "reward" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"objective": "pairwise"}))
    rl, direct, others = collect_jobs(str(tmp_path))
    assert [r.name for r in rl] == ["rl/0_beta=0.1_seed=0"] and others == ["reward"]
    assert [(r.name, r.finished) for r in direct] == [("dpo/0_dpo_beta=0.1_seed=0", True),
                                                      ("dpo/1_dpo_beta=0.3_seed=0", False),
                                                      ("dpo/2_dpo_beta=1_seed=0", False)]
    assert direct[1].reason == "logged up to step 2 of 4" and direct[2].reason == "no final/ model"
    row = direct_row(direct[0])
    # the last evaluation (step 4): KL 3.0, gold -0.2; gain against step 0's gold -1.0 = 0.8
    assert (row["kl"], row["gold"], row["start_gold"]) == (3.0, -0.2, -1.0)
    assert row["gain"] == pytest.approx(0.8) and row["accuracy"] == pytest.approx(0.7)
    assert load_direct_run(str(tmp_path / "dpo/0_dpo_beta=0.1_seed=0"), str(tmp_path)).beta == 0.1


def test_mean_points_average_each_setting_over_its_runs():
    points = mean_points("DPO", [("β = 0.1", 2.0, 0.4), ("β = 1", 0.5, 0.1), ("β = 0.1", 4.0, 0.6),
                                 ("β = 1", math.nan, 0.3)])
    # β = 0.1: KL (2 + 4) / 2 = 3, gain (0.4 + 0.6) / 2 = 0.5; β = 1: the nan run is left out
    assert points == [MethodPoint("DPO", "β = 0.1", 3.0, 0.5, 2), MethodPoint("DPO", "β = 1", 0.5, 0.1, 1)]


def test_best_method_at_each_budget_by_hand():
    points = [MethodPoint("RL", "β = 0.3", 1.0, 0.2, 2), MethodPoint("RL", "β = 0.03", 4.0, 0.8, 2),
              MethodPoint("DPO", "sigmoid β = 0.3", 2.0, 0.5, 2), MethodPoint("DPO", "sigmoid β = 0.03", 8.0, 0.6, 2),
              MethodPoint("best-of-n", "n = 2", 0.5, 0.3, 2), MethodPoint("best-of-n", "n = 16", 3.0, 0.9, 2)]
    # the largest KL is 8, so the budgets double from 0.5 up to 8
    assert default_budgets(points) == [0.5, 1.0, 2.0, 4.0, 8.0]
    rows = best_by_budget(points, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    # 0.25: nothing within it; 0.5: only n = 2 (0.3); 1: RL 0.2 < BoN 0.3; 2: DPO 0.5 > BoN 0.3 > RL 0.2;
    # 4: BoN 0.9 (KL 3) > RL 0.8 > DPO 0.5; 8: BoN 0.9 > RL 0.8 > DPO 0.6
    assert [r["winner"] for r in rows] == [None, "best-of-n", "best-of-n", "DPO", "best-of-n", "best-of-n"]
    assert rows[3]["DPO"].setting == "sigmoid β = 0.3" and rows[5]["RL"].gain == 0.8
    assert rows[1]["RL"] is None
    assert budget_verdict(rows) == ("Highest measured gold gain within each KL budget: best-of-n for budgets "
                                    "0.5–1 nats; DPO at 2 nats; best-of-n for budgets 4–8 nats.")


def test_report_puts_dpo_rl_and_best_of_n_on_one_frontier(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):  # RL: gold 0.05 * step, KL = step (fake_job), so the final gain is 0.15 at KL 3 (window 1)
        _fake_job(sweep, f"rl/{seed}_beta=0.1_seed={seed}", 0.1, seed, 4, 4)
        _fake_job(sweep, f"rl/{seed + 2}_beta=1_seed={seed}", 1.0, seed, 4, 4, kl=lambda i: 0.25 * i)
        _fake_dpo_job(sweep, f"dpo/{seed}_dpo_beta=0.1_seed={seed}", 0.1, seed, [-1.0, -0.6, -0.4 + 0.1 * seed],
                      [0.0, 1.0, 1.5 + seed])
    write_bon_csv([{"seed": s, "n": n, "kl": bon_kl(n), "d": math.sqrt(bon_kl(n)), "proxy": 0.0, "gold": 0.0,
                    "gold_se": 0.0, "gain": g, "prompts": 4} for s in (0, 1) for n, g in ((1, 0.0), (2, 0.1),
                                                                                         (4, 0.3))],
                  str(sweep / "best_of_n.csv"))
    report = write_report(str(sweep), str(tmp_path / "out"), window=1)
    rows = _read_csv(tmp_path / "out" / "dpo.csv")
    # DPO final points: seed 0 KL 1.5, gain -0.4 - (-1.0) = 0.6; seed 1 KL 2.5, gain 0.7; mean KL 2, gain 0.65
    assert [(float(r["kl"]), round(float(r["gain"]), 6)) for r in rows] == [(1.5, 0.6), (2.5, 0.7)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## DPO beside RL and best-of-n" in md and "![RL, DPO and best-of-n](methods.png)" in md
    _assert_png(tmp_path / "out" / "methods.png")
    # Budget 2: DPO 0.65 (KL 2) beats RL β = 1 (KL 0.75, gain 0.15) and best-of-n n = 4 (KL 0.64, gain 0.3)
    table = md[md.index("### The highest gold gain at each KL budget"):]
    line = next(x for x in table.splitlines() if x.startswith("| 2 |"))
    assert line.endswith("| DPO |") and "+0.650 (sigmoid β = 0.1, KL 2.00)" in line
    assert any(s.startswith("DPO fit: α = ") for s in report.summary)
    assert [r["job"] for r in report.direct_rows] == ["dpo/0_dpo_beta=0.1_seed=0", "dpo/1_dpo_beta=0.1_seed=1"]


def test_report_of_a_dpo_sweep_alone(tmp_path, capsys):
    _fake_dpo_job(tmp_path, "0_dpo_beta=0.1_seed=0", 0.1, 0, [-1.0, -0.5, -0.2], [0.0, 2.0, 3.0])
    report = write_report(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "report.csv").exists() and report.runs == []
    assert "DPO at 4 nats" in report.summary[-1]  # its one point (KL 3) is first within the budget of 4
    assert "## DPO beside RL and best-of-n" in (tmp_path / "out" / "report.md").read_text()
    (tmp_path / "only_reward" / "r" / ".hydra").mkdir(parents=True)
    (tmp_path / "only_reward" / "r" / ".hydra" / "config.yaml").write_text("objective: pairwise\n")
    with pytest.raises(ConfigError, match=r"^sweep_dir: .* holds no policy or DPO run, only r$"):
        write_report(str(tmp_path / "only_reward"), str(tmp_path / "out2"))


@pytest.mark.slow
def test_a_real_dpo_sweep_reports_what_its_runs_logged(tmp_path):
    sweep = tmp_path / "dpo"
    proc = run_script(["scripts/train_dpo.py", "-m", "+sweep=dpo_beta", "hydra/launcher=basic", "dpo.beta=0.1,1",
                       "seed=0", "trainer.max_steps=4", "trainer.warmup_steps=0", "trainer.eval_every=2", "data.num_train=128",
                       "data.num_eval=32", "trainer.batch_size=16", "frontier.num_prompts=16", "frontier.samples=2",
                       "logging.tensorboard=false", f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(["scripts/report.py", str(sweep)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "report" / "dpo.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["beta"]), r["status"]) for r in rows] == [(0.1, "finished"), (1.0, "finished")]
    for r in rows:
        lines = [json.loads(x) for x in (sweep / r["job"] / "metrics.jsonl").read_text().splitlines()]
        points = [m for m in lines if "frontier/kl" in m]
        assert [m["step"] for m in points] == [0, 2, 4] and points[0]["frontier/kl"] == 0.0
        assert float(r["kl"]) == pytest.approx(points[-1]["frontier/kl"])
        assert float(r["gain"]) == pytest.approx(points[-1]["frontier/gold_score"] - points[0]["frontier/gold_score"])
    assert "Highest measured gold gain within each KL budget" in proc.stdout

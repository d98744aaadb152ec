import csv
import importlib.util
import math

import pytest
import torch

from rlhf.analysis.best_of_n import (
    best_of_n,
    best_of_n_table,
    bon_kl,
    mean_over_seeds,
    powers_of_two,
    read_bon_csv,
    write_bon_csv,
)
from tests.conftest import FAST, ROOT


def test_bon_kl_matches_the_formula():
    # KL = log n - (n - 1) / n
    assert bon_kl(1) == 0.0  # log 1 - 0 / 1
    assert bon_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)  # log 2 - 1/2 = 0.193147
    assert bon_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)  # log 4 - 3/4 = 0.636294
    assert bon_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)  # log 64 - 63/64 = 3.174508


@pytest.mark.parametrize("n", [0, -1, 2.0, True, "4"])
def test_bon_kl_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        bon_kl(n)


def test_powers_of_two():
    assert powers_of_two(1) == [1]
    assert powers_of_two(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="n_max must be a power of two"):
        powers_of_two(12)


def test_best_of_n_keeps_the_proxy_best_and_reports_its_gold():
    proxy = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    gold = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    p, g = best_of_n(proxy, gold, 2)
    # groups [1, 3] and [2, 0]: the best are proxy 3 (gold 20) and proxy 2 (gold 30)
    assert p.tolist() == [[3.0, 2.0]]
    assert g.tolist() == [[20.0, 30.0]]
    p, g = best_of_n(proxy, gold, 4)
    assert (p.item(), g.item()) == (3.0, 20.0)  # one group: proxy 3 wins, its gold is 20
    p, g = best_of_n(proxy, gold, 1)
    assert g.tolist() == gold.tolist()  # best of one is the sample itself


def test_best_of_n_table_gain_is_relative_to_n_equals_one():
    # Two prompts. Gold disagrees with the proxy, so picking more makes gold worse (over-optimisation).
    proxy = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    gold = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    rows = best_of_n_table(proxy, gold, [1, 2, 4])
    assert [r["n"] for r in rows] == [1, 2, 4]
    # n = 1: mean gold = (100 + 10) / 8 = 13.75, gain 0
    assert rows[0]["gold"] == pytest.approx(13.75)
    assert rows[0]["gain"] == pytest.approx(0.0)
    # n = 2: prompt 1 keeps golds 20, 30; prompt 2 keeps golds 3 (proxy 1 > 0) and 1 (proxy 3 > 2)
    # mean = (20 + 30 + 3 + 1) / 4 = 13.5, gain = 13.5 - 13.75 = -0.25
    assert rows[1]["gold"] == pytest.approx(13.5)
    assert rows[1]["gain"] == pytest.approx(-0.25)
    # n = 4: golds 20 and 1, mean 10.5; per-prompt means [20, 1]: se = std([20, 1]) / sqrt(2) = 13.435 / 1.414 = 9.5
    assert rows[2]["gold"] == pytest.approx(10.5)
    assert rows[2]["gold_se"] == pytest.approx(9.5)
    assert rows[2]["proxy"] == pytest.approx(3.0)  # both prompts' best proxy is 3
    assert rows[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert rows[2]["d"] == pytest.approx(math.sqrt(math.log(4) - 0.75))


def test_best_of_n_checks_its_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        best_of_n(torch.zeros(2, 6), torch.zeros(2, 6), 4)
    with pytest.raises(ValueError, match="gold shape"):
        best_of_n(torch.zeros(2, 4), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"proxy must be \(prompts, n_max\)"):
        best_of_n(torch.zeros(4), torch.zeros(4), 2)
    with pytest.raises(TypeError, match="proxy must be a floating-point tensor"):
        best_of_n(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), 2)


def test_csv_round_trip_and_mean_over_seeds(tmp_path):
    rows = [{"seed": s, "n": n, "kl": bon_kl(n), "d": math.sqrt(bon_kl(n)), "proxy": 0.0, "gold": g,
             "gold_se": 0.1, "gain": g - g0, "prompts": 8}
            for s, g0 in ((0, 1.0), (1, 3.0)) for n, g in ((1, g0), (2, g0 + 0.5 * (s + 1)))]
    path = write_bon_csv(rows, str(tmp_path / "bon.csv"))
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == 4
    back = read_bon_csv(path)
    assert back[1]["n"] == 2 and back[1]["seed"] == 0 and back[1]["gold"] == pytest.approx(1.5)
    mean = mean_over_seeds(back)
    # n = 2 gains are 0.5 (seed 0) and 1.0 (seed 1): mean 0.75; golds 1.5 and 4.0: mean 2.75
    assert [r["n"] for r in mean] == [1, 2]
    assert mean[1]["gain"] == pytest.approx(0.75)
    assert mean[1]["gold"] == pytest.approx(2.75)
    assert mean[1]["seeds"] == 2


def test_best_of_n_script_on_the_builtin_task(tmp_path):
    spec = importlib.util.spec_from_file_location("bon_script", ROOT / "scripts" / "best_of_n.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path), "--seeds", "0", "--prompts", "4", "--n-max", "8",
                 *[o for o in FAST if o.startswith(("rollout.max_new_tokens", "data."))]])
    rows = read_bon_csv(str(tmp_path / "best_of_n.csv"))
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert all(r["prompts"] == 4 and r["seed"] == 0 for r in rows)
    assert rows[0]["gain"] == pytest.approx(0.0)
    # proxy = gold on the built-in task, and the best of a group is >= the group's mean, so no n can lose gold.
    assert all(r["gain"] >= -1e-6 for r in rows)
    assert rows[-1]["gold"] == pytest.approx(rows[-1]["proxy"])

"""benchmarks.uci.report: verdicts against published two-decimal numbers, published SEs."""

from __future__ import annotations

import math

import pytest

from benchmarks.uci import report
from benchmarks.uci.report import published, verdict


@pytest.mark.parametrize(
    ("ours", "ours_se", "pub", "pub_se", "higher", "expected"),
    [
        (0.545, 0.014, 0.54, 0.06, False, "="),  # energy 2018 RMSE: worse, tied at 2 decimals
        (-0.931, 0.013, -0.93, 0.01, True, "="),  # wine 2018 LL
        (0.0827, 0.0007, 0.08, 0.0, False, "="),  # kin8nm RMSE
        (0.00176, 0.0001, 0.00, 0.0, False, "="),  # naval RMSE
        (1.49, 0.06, 1.66, 0.04, False, "✓"),
        (-2.8177, 0.0085, -2.80, 0.01, True, "≈"),  # power 2016 LL: 1.0 SE after rounding
        (-0.952, 0.0136, -0.93, 0.01, True, "✗ 1.0 SE"),
        (2.63, 0.22, 1.11, 0.09, False, "✗ 6.4 SE"),
        (0.02, 0.0, 0.00, 0.0, False, "✗"),
    ],
)
def test_verdict(ours, ours_se, pub, pub_se, higher, expected):
    assert verdict(ours, ours_se, pub, pub_se, higher_better=higher) == expected


def test_published_ses_use_each_datasets_split_count():
    # The ICML column printed std/√20 for protein's 5 splits; we divide the authors' std by √5.
    _, rmse_se, _, ll_se = published("protein-tertiary-structure", "2016")
    assert rmse_se == pytest.approx(0.043603 / math.sqrt(5))
    assert ll_se == pytest.approx(0.009653 / math.sqrt(5))
    assert published("yacht", "2016") == (1.11, 0.09, -1.55, 0.03)
    assert published("energy", "2018")[1] == 0.06
    # Deep Ensembles print standard deviations: SE = std/√n_splits, NLL as an LL.
    rmse, rmse_se, ll, ll_se = published("protein-tertiary-structure", "DE 2017")
    assert (rmse, ll) == (4.71, -2.83)
    assert rmse_se == pytest.approx(0.06 / math.sqrt(5))
    assert published("yacht", "DE 2017")[3] == pytest.approx(0.21 / math.sqrt(20))


def _details(values: dict[int, float]) -> dict:
    return {"splits": [{"split": i, "rmse": v, "ll": -v} for i, v in values.items()]}


def test_ablations_are_paired_by_split():
    # Split 2 ran only in the ablation: the difference uses the shared splits 0 and 1.
    details = {
        "y|2016|m": _details({0: 1.0, 1: 3.0}),
        "y|2016|m+t": _details({0: 1.5, 1: 3.1, 2: 9}),
    }
    mean, se, n = report.paired_difference(details, "y|2016|m+t", "y|2016|m", "rmse")
    assert n == 2
    assert mean == pytest.approx(0.3)
    assert se == pytest.approx(math.sqrt(((0.5 - 0.3) ** 2 + (0.1 - 0.3) ** 2) / 1 / 2))
    rows = [
        {"dataset": "y", "budget": "2016", "method": m, "rmse_mean": 2.0, "rmse_se": 1.0,
         "ll_mean": -2.0, "ll_se": 1.0}
        for m in ("m", "m+t")
    ]  # fmt: skip
    (line,) = [x for x in report.ablation_lines(rows, details) if x.startswith("| y ")]
    assert "| +t |" in line
    assert "(+0.30 ± 0.20)" in line  # RMSE
    assert "(-0.30 ± 0.20)" in line  # LL


def test_goal_counts_wins_at_each_tables_budget():
    def row(dataset: str, budget: str, method: str, ll: float) -> dict[str, object]:
        n = report.published_splits(dataset)
        return {"dataset": dataset, "budget": budget, "method": method, "n_splits": n,
                "ll_mean": ll, "ll_se": 0.01}  # fmt: skip

    rows = [
        row("yacht", "2016", "mc_dropout", -1.40),  # 2016: -1.55 → win
        row("yacht", "2018", "het_mc_dropout", -1.30),  # 2018 grid: -1.25 → not a win
        row("energy", "2016", "deep_ensembles", 0.0),  # not an mcdrop method
        row("energy", "2016", "mc_dropout+glorot", 0.0),  # an ablation
    ]
    text = "\n".join(report.goal_lines(rows))
    assert "`2016`, our budget 2016: 1 of 9" in text
    assert "`2018 grid`, our budget 2018: 0 of 9" in text
    assert "`2016`, any budget: 1 of 9" in text


def test_deep_ensembles_are_counted_per_variant_and_budget_on_the_papers_score():
    # Each Deep Ensembles variant and budget gets its own count; the moment-matched LL (their
    # score) comes from the per-split details, the mixture LL from the row.
    def row(method: str, ll: float, budget: str = "2017") -> dict[str, object]:
        return {"dataset": "yacht", "budget": budget, "method": method, "n_splits": 2,
                "rmse_mean": 1.0, "rmse_se": 0.1, "ll_mean": ll, "ll_se": 0.01}  # fmt: skip

    def details(mm: float, backoffs: int = 0) -> dict:
        return {
            "splits": [
                {"split": i, "ll_moment_matched": mm, "lr": 0.01, "lr_backoffs": backoffs * i}
                for i in (0, 1)
            ]
        }

    rows = [
        row("deep_ensembles", -1.40),
        row("deep_ensembles+adversarial", -1.13),
        row("deep_ensembles", -1.13, "2017x2"),
    ]
    text = "\n".join(
        report.deep_ensemble_lines(
            rows,
            {
                "yacht|2017|deep_ensembles": details(-1.40),
                "yacht|2017|deep_ensembles+adversarial": details(-1.20),
                "yacht|2017x2|deep_ensembles": details(-1.15, backoffs=1),
            },
        )
    )
    assert "`deep_ensembles` at budget 2017 within one SE" in text
    assert "on 1 datasets run: RMSE 1, LL mixture 0, LL moment-matched 0." in text
    assert "`deep_ensembles+adversarial` at budget 2017 within one SE" in text
    assert "`deep_ensembles` at budget 2017x2 within one SE" in text
    assert text.count("on 1 datasets run: RMSE 1, LL mixture 1, LL moment-matched 1.") == 2
    assert "| yacht | 2017x2 | deep_ensembles | 2 |" in text
    assert "0.01 ×2 (1 stepped down)" in text

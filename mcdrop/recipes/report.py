"""How the recipes write results: numbers with five decimals, and the evaluation report as
markdown (the report itself is built by :mod:`mcdrop.recipes.evaluate`)."""

from __future__ import annotations

from typing import Any

#: Decimals of every number written to a model manifest or an evaluation report.
DIGITS = 5


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to :data:`DIGITS` decimals, inside dicts and lists
    too; other values (ints, strings, None) unchanged."""
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as markdown: metric tables and links to the plots."""
    parts = [
        f"# Evaluation of `{report['model']}` on {report['dataset']}",
        "",
        f"{report['n_test']} test rows (split seed {report['split_seed']}), "
        f"{report['n_samples']} MC samples (seed {report['seed']}).",
        "",
    ]
    if report.get("command"):
        parts += [f"Produced by `{report['command']}`.", ""]
    det, mc = report["metrics"]["deterministic"], report["metrics"]["mc"]
    names = [k for k in mc if k in det]
    parts += [
        "## Test metrics",
        "",
        _table(["metric", "deterministic", "MC dropout"], [[k, det[k], mc[k]] for k in names]),
        "",
    ]
    extra = [k for k in mc if k not in det]
    if extra:
        parts += [_table(["MC only", "value"], [[k, mc[k]] for k in extra]), ""]
    if report["task"] == "classification":
        inside = report["in_distribution"]
        rows = [["test set (in)", report["n_test"], "", "", "", inside["mean_mutual_information"]]]
        rows += [
            [
                name,
                o["n"],
                o["auroc_entropy"],
                o["auroc_mutual_information"],
                o["auroc_deterministic_entropy"],
                o["mean_mutual_information"],
            ]
            for name, o in report["ood"].items()
        ]
        parts += [
            "## Out-of-distribution detection (AUROC, 0.5 = chance)",
            "",
            _table(
                [
                    "inputs",
                    "n",
                    "MC entropy",
                    "mutual information",
                    "deterministic entropy",
                    "mean MI",
                ],
                rows,
            ),
            "",
        ]
        rej = report["rejection"]
        picks = [i for i, f in enumerate(rej["fractions"]) if f in (0.0, 0.1, 0.2, 0.5)]
        parts += [
            "## Accuracy after rejecting the most uncertain test inputs",
            "",
            _table(
                ["rejected", "by MC entropy", "by mutual information", "deterministic"],
                [
                    [
                        f"{rej['fractions'][i]:.0%}",
                        rej["entropy"][i],
                        rej["mutual_information"][i],
                        rej["deterministic_entropy"][i],
                    ]
                    for i in picks
                ],
            ),
            "",
        ]
    else:
        cov = report["coverage"]
        parts += [
            "## Interval coverage (central Gaussian intervals)",
            "",
            _table(
                ["nominal", "deterministic (noise only)", "MC dropout"],
                [
                    [f"{lv:.0%}", cov["deterministic"][i], cov["mc"][i]]
                    for i, lv in enumerate(cov["levels"])
                ],
            ),
            "",
        ]
    for note in report.get("notes", []):
        parts += [f"Note: {note}", ""]
    if report["plots"]:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(parts)

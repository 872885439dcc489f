"""Recipes built on the mcdrop core: datasets, training, and evaluation reports with plots.

The core (``import mcdrop``) never imports this package, so it needs neither scikit-learn nor
tqdm nor matplotlib. The recipes need the ``recipes`` extra (``pip install 'mcdrop[recipes]'``:
scikit-learn and tqdm); plots also need ``plots`` (matplotlib). ``mcdrop train`` and
``mcdrop evaluate`` run :func:`mcdrop.recipes.train.train` and
:func:`mcdrop.recipes.evaluate.evaluate_model`.

    datasets.py   digits, diabetes (scikit-learn) and Fashion-MNIST (Debian), seeded splits
    train.py      fit a network with dropout and write a model directory
    evaluate.py   score a model directory: calibration, OOD detection, interval coverage
    scores.py     a classifier's deterministic and MC outputs on one input set
    ood.py        out-of-distribution input sets (noise, the other image dataset)
    report.py     rounded numbers and the markdown report
    plots.py      the report's PNG plots (matplotlib)
"""

from __future__ import annotations

import importlib.util

#: Modules the recipes import, and the distributions that provide them.
REQUIRED = {"sklearn": "scikit-learn", "tqdm": "tqdm"}


def _missing() -> list[str]:
    # find_spec looks the modules up without importing them (scikit-learn takes ~1 s).
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


if _missing():
    raise ImportError(
        f"mcdrop.recipes needs {' and '.join(_missing())}: pip install 'mcdrop[recipes]'"
    )

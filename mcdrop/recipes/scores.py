"""A classifier's outputs on one input set, deterministic and MC, and the uncertainty scores
read off them.

Shape legend: ``N`` rows, ``K`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mcdrop.metrics import auroc
from mcdrop.predictor import ClassificationPrediction, Predictor
from mcdrop.stats import ClassificationSummary, entropy


@dataclass(frozen=True)
class ClassifierScores:
    """Deterministic and MC outputs of a classifier on one input set.

    Attributes:
        deterministic: ``(N, K)`` probabilities with dropout off.
        mc: ``(N, K)`` MC predictive probabilities.
        entropy: ``(N,)`` MC predictive entropy (nats).
        mutual_information: ``(N,)`` MC mutual information (nats).
        deterministic_entropy: ``(N,)`` entropy of ``deterministic`` (the no-MC baseline).
    """

    deterministic: Tensor
    mc: Tensor
    entropy: Tensor
    mutual_information: Tensor
    deterministic_entropy: Tensor

    #: the uncertainty scores, by report name
    SCORES = ("entropy", "mutual_information", "deterministic_entropy")


def score_classifier(
    predictor: Predictor, x: Tensor, *, n_samples: int, seed: int = 0
) -> ClassifierScores:
    """Run ``predictor`` on ``x (N, *input_shape)`` deterministically and with S MC samples."""
    prediction = predictor.predict(x)
    summary, _ = predictor.uncertainty(x, n_samples, seed=seed)
    assert isinstance(prediction, ClassificationPrediction)
    assert isinstance(summary, ClassificationSummary)
    det = prediction.probabilities
    return ClassifierScores(
        deterministic=det.double(),
        mc=summary.probabilities.double(),
        entropy=summary.entropy.double(),
        mutual_information=summary.mutual_information.double(),
        deterministic_entropy=entropy(det.double()),
    )


def ood_aurocs(inside: ClassifierScores, outside: ClassifierScores) -> dict[str, float]:
    """AUROC of each uncertainty score at telling ``outside`` rows from ``inside`` rows."""
    return {
        f"auroc_{name}": auroc(getattr(inside, name), getattr(outside, name))
        for name in ClassifierScores.SCORES
    }

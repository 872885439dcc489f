"""Saving your own model as a model directory in one call, checked so the folder always loads
and serves.

:func:`save` writes what :func:`mcdrop.load` and ``mcdrop serve`` read (``model.json`` and
``weights.safetensors``, see :mod:`mcdrop.checkpoint`), after checking that the architecture it
names (your ``factory`` with its ``params``, or a built-in) rebuilds a network that takes the
model's weights and gives the model's outputs, and that a server's warm-up takes the model, by
the library's checks that the warm-up runs: outputs of the manifest's shape
(:func:`~mcdrop.checkpoint.outputs_problem`), batches of any size
(:func:`~mcdrop.checking.batch_problem`), rows that do not mix with their batch
(:func:`~mcdrop.checking.mixing_problem`), a classifier's logits, not probabilities
(:func:`~mcdrop.checking.probabilities_problem`), dropout that sampling samples
(:func:`~mcdrop.sampling.plan`), at rates below 1 (:func:`~mcdrop.checking.rate_one_problem`),
and the warm-up's largest pass (:func:`~mcdrop.checking.warm_up_pass_problem`, up to
:data:`MAX_WARM_UP_PASS_FLOPS` of work). A mistake shows when you save, not when a server
loads the folder months later.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mcdrop import checkpoint, sampling
from mcdrop.checking import (
    WARM_UP_ROWS,
    batch_problem,
    mixing_problem,
    probabilities_problem,
    rate_one_problem,
    warm_up_pass_flops,
    warm_up_pass_problem,
)
from mcdrop.checking import example_inputs as random_inputs
from mcdrop.checkpoint import LoadedModel, ModelSpec, Normalization, Task
from mcdrop.coverage import declared_rates
from mcdrop.exceptions import (
    CheckpointError,
    InvalidArgumentError,
    McDropError,
    UnsampledDropoutWarning,
)
from mcdrop.nets import build
from mcdrop.planning import torchscript_problem
from mcdrop.sampling import predict

#: Rows of the example batch that checks the rebuilt network against the model.
_EXAMPLE_ROWS = 2
_RTOL, _ATOL = 1e-4, 1e-5

#: The most work (the sampling plan's count: multiply-adds ×2 of matrix products and
#: convolutions) of the warm-up's largest pass, 16 samples of 32 rows, that :func:`save` runs:
#: ~1-4 s on one CPU core (14-47 GFLOP/s measured, CNNs to wide MLPs; a CIFAR-sized CNN adds
#: 0.05 s, or 1 s with spatial dropout: ``benchmarks/README.md``). A model of more (an
#: ImageNet-sized network with dropout in its blocks: TFLOPs, minutes) leaves it to the warm-up
#: and ``mcdrop check``. A count, not a clock: it decides the same on every machine.
MAX_WARM_UP_PASS_FLOPS = 50 * 10**9


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    task: Task,
    input_shape: Sequence[int],
    labels: Sequence[str],
    factory: str | None = None,
    architecture: str | None = None,
    params: Mapping[str, Any] | None = None,
    name: str | None = None,
    tau: float | None = None,
    likelihood: Literal["homoscedastic", "heteroscedastic"] = "homoscedastic",
    input_normalization: Normalization | Mapping[str, Any] | None = None,
    target_normalization: Normalization | Mapping[str, Any] | None = None,
    dropout: float | None = None,
    default_n_samples: int = 100,
    metrics: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    description: str = "",
    version: str = "1",
    example_inputs: Any = None,
) -> LoadedModel:
    """Write ``model`` as the model directory ``directory``, and return it loaded back, once it
    is checked to load and to pass a server's warm-up.

    Args:
        model: the trained network, mapping ``(N, *input_shape)`` float32 rows to ``(N, K)``
            logits (classification), means (regression), or K means then K log-variances
            (``likelihood="heteroscedastic"``), where K is ``len(labels)``.
        directory: the folder to write (created if needed; its name is the model's default name).
        task: "classification" or "regression".
        input_shape: the shape of one input row, e.g. ``[3, 32, 32]``.
        labels: class names, or target names; K of them.
        factory: ``"package.module:callable"`` that builds the network from ``params``; the
            module must be importable where the model is loaded (not ``__main__``).
        architecture: instead of ``factory``, a built-in: "mlp", "cnn" or "row_lstm".
        params: the keyword arguments the factory builds ``model`` with (JSON values).
        name: the model's name (default: the directory's name).
        tau: a homoscedastic regressor's noise precision (noise variance ``1/tau``).
        likelihood: "homoscedastic" (noise ``1/tau``) or "heteroscedastic" (predicted).
        input_normalization, target_normalization: ``{"mean": ..., "std": ...}`` (lists,
            arrays or tensors) applied around ``model`` when it is loaded, so the loaded model
            takes and returns original units while ``model`` works on standardised ones.
        dropout, default_n_samples, metrics, training, description, version: recorded in the
            manifest (see :class:`~mcdrop.checkpoint.ModelSpec`).
        example_inputs: ``(N, *input_shape)`` rows the model takes, in original units (a
            tensor, array or nested lists; N from 1 to 64, finite, float32), saved with it as
            ``examples.safetensors``: the check here, ``mcdrop check`` and the service's
            warm-up run the model on them instead of random standard-normal rows. Give them
            when random rows are not inputs of the model (token ids, counts, pixels in
            [0, 255]).

    Returns:
        the directory loaded back (:class:`~mcdrop.checkpoint.LoadedModel`), as a server would.

    Raises:
        InvalidArgumentError: the manifest would be invalid, ``example_inputs`` are not such
            rows, the architecture does not rebuild ``model`` (other weights, or other
            outputs, or it fails on the example rows), ``model`` is a TorchScript module, or a
            server would refuse it (no dropout that sampling samples, dropout at rate 1, rows
            whose outputs depend on their batch, a batch size it fails on, the warm-up's pass
            of 16 samples of 32 rows where it runs it, a classifier that returns probabilities
            rather than logits); nothing was written.
        OSError: a file could not be written (a full disk, a folder not writable), named in
            the message; the folder's files were left as they were.
    """
    if isinstance(model, torch.jit.ScriptModule):
        # Its layers are compiled: no dropout rate to read, no dropout call to sample.
        raise InvalidArgumentError(f"cannot save: {torchscript_problem(model)}")
    directory = Path(directory)
    arch = _architecture(factory, architecture, params)
    spec = _spec(
        {
            "name": directory.name if name is None else name,
            "version": version,
            "task": task,
            "input_shape": [int(d) for d in input_shape],
            "labels": list(labels),
            "architecture": arch,
            "dropout": dropout,
            "tau": tau,
            "likelihood": likelihood,
            "input_normalization": _normalization(input_normalization, "input_normalization"),
            "target_normalization": _normalization(target_normalization, "target_normalization"),
            "default_n_samples": default_n_samples,
            "metrics": dict(metrics or {}),
            "training": _json(dict(training or {}), "training"),
            "description": description,
        }
    )
    examples = _examples(example_inputs, spec)
    _check_rebuilds(model, spec, examples)
    checkpoint.save(directory, spec, model, example_inputs=examples)
    return checkpoint.load(directory, trust_model_code=True)


def _examples(value: Any, spec: ModelSpec) -> Tensor | None:
    """``example_inputs`` as a float32 tensor on the CPU, checked, or None."""
    if value is None:
        return None
    try:
        if isinstance(value, Tensor):
            x = value.detach().to("cpu", torch.float32)
        else:
            x = torch.as_tensor(_plain(value), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"cannot save: example_inputs must be numeric (N, *input_shape) rows: {exc}"
        ) from None
    if problem := checkpoint.examples_problem(x.contiguous(), spec.input_shape):
        raise InvalidArgumentError(f"cannot save: {problem}")
    return x.contiguous()


def _architecture(
    factory: str | None, architecture: str | None, params: Mapping[str, Any] | None
) -> dict[str, Any]:
    if (factory is None) == (architecture is None):
        raise InvalidArgumentError(
            "give the architecture as factory='package.module:callable' (your own code) or as "
            "architecture='mlp' (a built-in), exactly one of them"
        )
    value: str | None
    if factory is not None:
        if not isinstance(factory, str) or factory.partition(":")[0] == "__main__":
            raise InvalidArgumentError(
                f"factory {factory!r} is not a 'package.module:callable' that a server can import "
                "(a script run as __main__ cannot be): move the network's builder into a module "
                "of your package"
            )
        key, value = "factory", factory
    else:
        key, value = "name", architecture
    return {key: value, "params": _json(dict(params or {}), "params")}


def _json(value: dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` as the manifest will give it back (tuples become lists), or an error."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{what} must hold JSON values only (numbers, strings, booleans, lists, objects): {exc}"
        ) from None


def _plain(value: Any) -> Any:
    """Lists from tensors and arrays (anything with ``tolist``), as JSON holds them."""
    return value.tolist() if hasattr(value, "tolist") else value


def _normalization(
    value: Normalization | Mapping[str, Any] | None, what: str
) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Normalization):
        value = {"mean": value.mean, "std": value.std}
    if not (isinstance(value, Mapping) and set(value) == {"mean", "std"}):
        raise InvalidArgumentError(f"{what} must be {{'mean': ..., 'std': ...}}")
    return {key: _plain(value[key]) for key in ("mean", "std")}


def _spec(fields: dict[str, Any]) -> ModelSpec:
    try:
        spec = ModelSpec.from_dict(fields, source="the manifest")
        # Normalisation statistics must make tensors of the right kind.
        checkpoint.wrap(spec, nn.Identity(), source="the manifest")
    except CheckpointError as exc:
        raise InvalidArgumentError(f"cannot save: {exc}") from None
    return spec


def _check_rebuilds(model: nn.Module, spec: ModelSpec, examples: Tensor | None) -> None:
    """Raise unless ``spec.architecture`` rebuilds a network that takes ``model``'s weights and
    gives its outputs, of the shape ``spec`` says, on ``examples`` (else random rows)."""
    arch = spec.architecture
    named = f"{arch.get('factory') or arch.get('name')!r} with params {arch['params']}"
    try:
        rebuilt = build(arch, trust_model_code=True)  # the caller's own code, named by them
    except CheckpointError as exc:
        raise InvalidArgumentError(f"cannot save: {exc}") from None
    state = model.state_dict()
    mine = {k: tuple(v.shape) for k, v in state.items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    problems = []
    if missing := sorted(theirs.keys() - mine.keys()):
        problems.append(f"weights the model lacks: {_few(missing)}")
    if extra := sorted(mine.keys() - theirs.keys()):
        problems.append(f"weights it lacks: {_few(extra)}")
    shapes = sorted(
        f"{k}: {list(mine[k])} in the model, {list(theirs[k])} rebuilt"
        for k in mine.keys() & theirs.keys()
        if mine[k] != theirs[k]
    )
    if shapes:
        problems.append(f"other shapes: {_few(shapes)}")
    if problems:
        raise InvalidArgumentError(
            f"cannot save: {named} builds a network whose weights differ from the model's ("
            + "; ".join(problems)
            + "): pass the factory and params the model was built with"
        )
    rates = {(d.name, d.attribute): d.rate for d in declared_rates(model)}
    rebuilt_rates = {(d.name, d.attribute): d.rate for d in declared_rates(rebuilt)}
    if rates != rebuilt_rates:
        differ = sorted(
            f"{name}.{attr}: {rates.get((name, attr), 0)} in the model, "
            f"{rebuilt_rates.get((name, attr), 0)} rebuilt"
            for name, attr in rates.keys() | rebuilt_rates.keys()
            if rates.get((name, attr)) != rebuilt_rates.get((name, attr))
        )
        raise InvalidArgumentError(
            f"cannot save: {named} builds a network with other dropout rates ({_few(differ)}): "
            "MC samples of the saved model would differ from the model's; pass the params the "
            "model was built with"
        )
    rebuilt.load_state_dict(state)
    x = random_inputs(spec, _EXAMPLE_ROWS) if examples is None else examples
    n = x.shape[0]
    wrapped = checkpoint.wrap(spec, model)
    what = (
        f"{n} random rows of input_shape {spec.input_shape}"
        if examples is None
        else f"its {n} example_inputs rows"
    )
    try:
        want = predict(wrapped, x)
    except Exception as exc:
        if problem := batch_problem(wrapped, x):  # a batch of another size passes
            raise InvalidArgumentError(f"cannot save: {problem}") from None
        hint = (
            "is input_shape the shape of one input row? If the model takes other values "
            "(token ids, counts, pixels in [0, 255]), give rows it takes as example_inputs"
            if examples is None
            else "give rows the model takes"
        )
        raise InvalidArgumentError(
            f"cannot save: the model fails on {what} ({type(exc).__name__}: {exc}); {hint}"
        ) from None
    if problem := checkpoint.outputs_problem(spec, want, n):
        raise InvalidArgumentError(f"cannot save: {problem}")
    again = predict(wrapped, x)
    if not torch.allclose(again, want, rtol=_RTOL, atol=_ATOL, equal_nan=True):
        # (deterministic prediction turns off every dropout call sampling samples, MC-dropout
        # style F.dropout(h, p, training=True) included: what is left is the model's own)
        diff = (again - want).abs().max().item()
        raise InvalidArgumentError(
            f"cannot save: the model's eval pass is not deterministic: two passes of the same "
            f"{n} rows give outputs that differ (by up to {diff:.3g}), so no "
            "rebuilt network can be checked against it, and its deterministic predictions "
            "would change from call to call; remove what changes between calls from its "
            "forward: randomness (e.g. torch.rand, or a dropout of its own made from random "
            "numbers: write it as nn.Dropout or F.dropout, which MC sampling samples), or state "
            "it updates and uses (e.g. a count of its calls added to its outputs)"
        )
    if not bool(torch.isfinite(want).all()):
        # (compared below, NaN would read as a rebuilt network that gives other outputs)
        rows = torch.nonzero(~torch.isfinite(want).flatten(1).all(1)).flatten().tolist()
        raise InvalidArgumentError(
            f"cannot save: the model's outputs on {what} are not finite (NaN or inf, rows "
            f"{rows}), so they cannot show that the architecture rebuilds it; give rows it "
            "answers with finite values as example_inputs"
        )
    got = predict(checkpoint.wrap(spec, rebuilt), x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=_RTOL, atol=_ATOL):
        diff = (got - want).abs().max().item() if got.shape == want.shape else math.inf
        raise InvalidArgumentError(
            f"cannot save: {named} rebuilds a network that takes the model's weights but gives "
            f"other outputs (by up to {diff:.3g}): the params build another network (e.g. "
            "another activation); pass the params the model was built with"
        )
    _check_serves(spec, wrapped, x, want, what)


def _check_serves(spec: ModelSpec, wrapped: nn.Module, x: Tensor, want: Tensor, what: str) -> None:
    """Raise where a server's warm-up would refuse the model ``wrapped`` (``want``: its outputs
    on ``x``, described by ``what``), by the checks of the library that the warm-up runs: a
    batch size it fails on, rows whose outputs depend on their batch, a classifier's outputs
    that are probabilities rather than logits, no dropout that sampling samples (every rate 0),
    a dropout call at rate 1, the warm-up's largest pass (16 samples of 32 rows,
    :func:`~mcdrop.checking.warm_up_pass_problem`) where its work is at most
    :data:`MAX_WARM_UP_PASS_FLOPS`."""
    # Batch sizes first (up to the warm-up's 32 rows), so that a forward written for some
    # sizes is named as such, not as rows that mix or a sampling pass that fails.
    problem = (
        batch_problem(wrapped, x, largest=WARM_UP_ROWS)
        or mixing_problem(wrapped, x, want, rows=what)
        or probabilities_problem(spec, wrapped, x, want)
    )
    if problem:
        raise InvalidArgumentError(f"cannot save: {problem}")
    try:
        with warnings.catch_warnings():
            # Dropout sampling cannot reach is the server's warning at its warm-up and
            # mcdrop check's problem, not a reason to refuse the save (raised where warnings are
            # errors, it was one)
            warnings.simplefilter("ignore", UnsampledDropoutWarning)
            plan = sampling.plan(wrapped, x)
    except McDropError as exc:  # NoDropoutError, UnsupportedModelError: they say what to do
        raise InvalidArgumentError(f"cannot save: {exc}") from None
    except Exception as exc:  # the model's own code, in a pass that samples
        raise InvalidArgumentError(
            f"cannot save: the model fails on a sampling pass of {what} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if problem := rate_one_problem(wrapped, plan):
        raise InvalidArgumentError(f"cannot save: {problem}")
    # Last, the costly one: its memory is bounded as a server's is (its passes cut to the
    # activation budget), its time by the bound on its work.
    if warm_up_pass_flops(plan) > MAX_WARM_UP_PASS_FLOPS:
        return
    if problem := warm_up_pass_problem(wrapped, x, plan):
        raise InvalidArgumentError(f"cannot save: {problem}")


def _few(items: list[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more

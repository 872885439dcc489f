"""The ``mcdrop`` command: ``serve``, ``train``, ``evaluate``, ``calibrate``, ``check``,
``predict`` and ``models``.

Heavy imports (torch, FastAPI) happen inside the sub-command that needs them, so
``mcdrop predict --url ...`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args, get_origin

from service.config import ModelSettings, Settings, TrustSettings, env_only

if TYPE_CHECKING:
    from service.client import Client


def _flag_type(annotation: Any) -> Any:
    """The converter for a settings field: ``int | None`` -> ``int``; a tuple of strings stays a
    string, which the setting splits at commas; a choice of strings is a string."""
    if get_origin(annotation) in (tuple, list, Literal):
        return str
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


# Every setting is a `mcdrop serve` flag, derived so the two never drift apart; except secrets
# (the API key), which a command line would show to every user of the machine in `ps`.
_SETTINGS_FLAGS = {
    name: _flag_type(f.annotation)
    for name, f in Settings.model_fields.items()
    if not env_only(name)
}

#: The environment variable ``mcdrop predict`` and ``mcdrop models`` read the service URL from.
URL_ENV = "MCDROP_URL"
DEFAULT_URL = "http://localhost:8000"


#: How ``mcdrop`` exits (its help's epilog; README.md, "From the command line", says the same):
#: one status for each kind of failure, whether a local model or a service met it.
EXIT_STATUS = """\
exit status:
  0    done (mcdrop check: no error found)
  1    a failure that is not the request's: the service answered 5xx or not at all, or 408
       or 429 (busy or slow: send it again later), a model directory did not load, the
       machine ran out of memory; mcdrop check: an error found
  2    the request was refused, to fix before sending it again: the command line, or inputs
       or options refused as the service refuses them with a 4xx other than 408 and 429
       (invalid_input, invalid_argument, limit_exceeded, model_rejected_input, ...), locally
       or over HTTP
  3    mcdrop serve: the server did not start (a model failed to load with
       MCDROP_EXIT_ON_ERROR, or the address is in use)
  130  interrupted
  141  standard output was closed before all of it was written (| head): nothing is said"""

#: The status of a command whose reader stopped reading, as a shell reports a process that
#: SIGPIPE ended (128 + 13): what `cat file | head` leaves, with no message.
CLOSED_OUTPUT = 141

#: 4xx statuses that say nothing is wrong with the request, only with its moment: 408 (the
#: body came too slowly, e.g. a congested network) and 429 (too many requests, e.g. a proxy's
#: rate limit). The same request may succeed later, so they exit 1 with the 5xx, not 2.
TRANSIENT_STATUSES = frozenset({408, 429})


class UsageError(Exception):
    """A command line to fix (exit status 2, like argparse's own usage errors)."""


def _add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings: type[TrustSettings]
) -> None:
    """One flag per field of ``settings`` on ``parser`` (or one of its argument groups); a bool
    gets ``--name`` and ``--no-name``."""
    for name, field in settings.model_fields.items():
        if env_only(name):
            continue
        kind = _flag_type(field.annotation)
        default = field.default
        shown = "none" if default == () else str(default).lower() if kind is bool else default
        options: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        )
        if get_origin(field.annotation) is Literal:
            options["choices"] = get_args(field.annotation)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=None,
            help=f"{field.description} (default: {shown})",
            **options,
        )


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load``'s keyword arguments from the flags, else ``MCDROP_*``: trust (closed by default),
    device and dtype."""
    from pydantic import ValidationError

    overrides = {k: getattr(args, k) for k in ModelSettings.model_fields}
    try:
        options = ModelSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one line per setting, not pydantic's report
        raise UsageError(_errors(exc)) from None
    return {name: getattr(options, name) for name in ModelSettings.model_fields}


def _errors(exc: Any) -> str:
    """A pydantic ValidationError as one line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service import server

    overrides = {k: getattr(args, k) for k in _SETTINGS_FLAGS if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # one line per setting, not pydantic's report
        raise UsageError(_errors(exc)) from None
    if settings.exit_on_error:  # the lifespan would refuse too, after a traceback
        from service.registry import discover

        _, problem = discover(settings.model_dir)
        if problem is not None:
            raise UsageError(
                f"{problem}: give --model-dir (or MCDROP_MODEL_DIR) a folder of model directories"
            )
    # prometheus_client writes every metric's values there (service.metrics): a folder that is
    # not there would fail each model's load, blaming the model
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared is not None and not os.path.isdir(shared):
        raise UsageError(
            f"PROMETHEUS_MULTIPROC_DIR {shared!r} is not a folder: make it, or unset it (mcdrop "
            "serve --workers makes one of its own)"
        )
    server.run(settings)
    return 0


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch on ``n`` threads for the block, then as before. The recipes default to one: as fast
    per core on these small nets, and no spinning OpenMP workers on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    try:
        from mcdrop.recipes.train import TrainConfig, train
    except ImportError as exc:  # the recipes extra is missing: say which install fixes it
        raise SystemExit(f"mcdrop: error: {exc}") from exc

    config = TrainConfig(
        dataset=args.dataset,
        out=args.out,
        hidden=args.hidden,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        n_samples=args.n_samples,
        threads=args.threads,
        progress=not args.quiet,
        arch=args.arch,
        kind=args.kind,
        channels=args.channels,
        spatial_dropout=args.spatial_dropout,
        train_size=args.train_size,
        exclude_classes=args.exclude_classes,
    )
    loaded = train(config, command="mcdrop " + shlex.join(args.argv))
    print(json.dumps({"model": str(args.out), "metrics": loaded.spec.metrics}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    try:
        from mcdrop.recipes.evaluate import evaluate_model
    except ImportError as exc:  # the recipes extra is missing: say which install fixes it
        raise SystemExit(f"mcdrop: error: {exc}") from exc

    with _torch_threads(args.threads):
        report = evaluate_model(
            args.model_dir,
            args.dataset,
            out=args.out,
            n_samples=args.n_samples,
            seed=args.seed,
            ood_classes=args.ood_classes,
            limit=args.limit,
            plots=not args.no_plots,
            command="mcdrop " + shlex.join(args.argv),
            **_load_options(args),
        )
    summary = {k: report[k] for k in ("model", "dataset", "n_test", "n_samples", "metrics")}
    if "ood" in report:
        summary["ood"] = report["ood"]
    summary["written"] = None if args.out is None else str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    try:
        from mcdrop.recipes import decisions
    except ImportError as exc:  # the recipes extra is missing: say which install fixes it
        raise SystemExit(f"mcdrop: error: {exc}") from exc

    with _torch_threads(args.threads):
        calibration = decisions.calibrate_dir(
            args.model_dir,
            data=args.data,
            n_samples=args.n_samples,
            seed=args.seed,
            command="mcdrop " + shlex.join(args.argv),
            **_load_options(args),
        )
        report = decisions.report(args.model_dir, **_load_options(args)) if args.report else None
    written = Path(args.model_dir) / "calibration.json"
    if args.json:
        summary = {**calibration.to_dict(), "written": str(written), "test": report}
        for bulky in ("scores", "conformal"):
            summary.pop(bulky)
        print(json.dumps(summary, indent=2))
        return 0
    print(decisions.summary(calibration, written))
    if report is not None:
        print()
        print(decisions.markdown(report), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    from mcdrop import checkpoint
    from mcdrop.checking import check

    loaded = checkpoint.load(args.model_dir, **_load_options(args))
    # Rows of the model's own (examples.safetensors) where it has them, else random ones.
    report = check(loaded, n_rows=args.rows, n_samples=args.n_samples, seed=args.seed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


#: The most bytes ``--inputs`` reads: the service's request-body limit (``max_body_bytes``), so
#: that /dev/zero or a huge file is refused rather than read until memory runs out.
MAX_INPUTS_BYTES: int = Settings.model_fields["max_body_bytes"].default


def _read_inputs(value: str) -> list[Any]:
    """``--inputs``: rows as JSON, ``@file`` or ``-`` (standard input), read at most
    :data:`MAX_INPUTS_BYTES`."""
    if value == "-":
        text: str | bytes = _read_bounded(sys.stdin, "standard input")
    elif value.startswith("@"):
        path = Path(value[1:])
        try:
            size = path.stat().st_size
            if path.is_file() and size > MAX_INPUTS_BYTES:  # refused without reading it
                raise UsageError(_too_large(str(path), f"{size:_} bytes"))
            with path.open("rb") as file:  # not a regular file (a device, a pipe): read it bounded
                text = _read_bounded(file, str(path))
        except OSError as exc:  # a file named wrong is the command line's to fix, as a typo is
            raise UsageError(f"--inputs {value}: cannot read it: {exc.strerror}") from None
    else:
        text = value
    try:
        data = json.loads(text)
    except RecursionError:  # json recurses once per level of nesting
        raise UsageError(
            "--inputs is not valid JSON: nested too deeply (arrays or objects inside one "
            "another beyond Python's recursion limit); give a list of rows"
        ) from None
    except ValueError as exc:
        raise UsageError(f"--inputs is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "inputs" in data:
        data = data["inputs"]
    if not isinstance(data, list):
        raise UsageError('--inputs must be a JSON list of rows (or {"inputs": [...]})')
    return data


def _read_bounded(file: IO[Any], name: str) -> str | bytes:
    data = file.read(MAX_INPUTS_BYTES + 1)
    if len(data) > MAX_INPUTS_BYTES:
        raise UsageError(_too_large(name, f"more than {MAX_INPUTS_BYTES:_} bytes"))
    return data


def _too_large(name: str, size: str) -> str:
    return (
        f"--inputs {name} holds {size}, above the limit of {MAX_INPUTS_BYTES:_} bytes (the "
        "service's max_body_bytes): send fewer rows at a time"
    )


def _predict(args: argparse.Namespace) -> int:
    if args.model_dir is not None and args.timeout is not None:
        raise UsageError("--timeout bounds a request to a service (--url), not --model-dir")
    inputs = _read_inputs(args.inputs)
    if args.model_dir is not None:
        result = _predict_local(args, inputs)
    else:
        with _client(args) as client:
            if args.uncertainty:
                result = client.uncertainty(
                    args.model,
                    inputs,
                    n_samples=args.n_samples,
                    seed=args.seed,
                    level=args.level,
                    return_samples=args.return_samples,
                    tolerance=args.tolerance,
                    max_n_samples=args.max_n_samples,
                    reject_rate=args.reject_rate,
                    reject_threshold=args.reject_threshold,
                    reject_score=args.reject_score,
                    coverage=args.coverage,
                )
            else:
                result = client.predict(args.model, inputs)
    print(result.model_dump_json(indent=2, exclude_none=True))
    return 0


def _model_path(model_dir: Path, name: str) -> Path:
    """``model_dir/name``, for a name that is one folder name: as the service, which names its
    models by their folders, no name reaches outside ``model_dir`` (``../other``, ``/etc``)."""
    if name in ("", ".", "..") or Path(name).name != name:  # a separator: more than one part
        raise UsageError(
            f"invalid model name {name!r}: give the name of a folder inside --model-dir "
            f"({model_dir}), without '/', and not '.' or '..'"
        )
    return Path(model_dir) / name


def _predict_local(args: argparse.Namespace, inputs: list[Any]) -> Any:
    from mcdrop import checkpoint
    from mcdrop.masks import fresh_seed
    from mcdrop.predictor import Predictor
    from service import convert
    from service.registry import warm_up

    most_samples = _max_n_samples()
    model_path = _model_path(args.model_dir, args.model)
    options = _load_options(args)
    manifest = model_path / checkpoint.MANIFEST
    if not os.path.lexists(manifest):  # as the service, which finds its models so: a 404
        raise UsageError(f"no model {args.model!r} in --model-dir {args.model_dir} (no {manifest})")
    loaded = checkpoint.load(model_path, **options)
    predictor = Predictor(loaded, results_device="cpu")
    # As the service before its first request: a model whose input_shape does not fit its
    # network is named as the manifest's fault, not as the user's rows'.
    warm_up(predictor, manifest)
    x = convert.to_tensor(inputs, predictor)
    if not args.uncertainty:
        return convert.predict_response(predictor, predictor.predict(x))
    seed = fresh_seed() if args.seed is None else args.seed
    auto = args.n_samples == "auto"
    # The service's limit on samples, in the service's words: a local run is held to it too.
    asked, what = (args.max_n_samples, "max_n_samples") if auto else (args.n_samples, "n_samples")
    if asked is not None and asked > most_samples:
        raise UsageError(f"{what}={asked} is above the limit of {most_samples}")
    tolerance, most = args.tolerance, args.max_n_samples
    if auto:  # the service's defaults, so both modes print the same
        from mcdrop import adaptive

        tolerance = adaptive.default_tolerance(loaded.spec.task) if tolerance is None else tolerance
        most = min(adaptive.DEFAULT_MAX_N_SAMPLES, most_samples) if most is None else most
    from mcdrop import calibration

    decision = calibration.resolve(
        loaded.spec.task,
        loaded.calibration,
        reject_rate=args.reject_rate,
        reject_threshold=args.reject_threshold,
        reject_score=args.reject_score,
        coverage=args.coverage,
        model=f"model {loaded.spec.name!r}",
    )
    n_samples = args.n_samples
    if n_samples is None:  # the model's default, never above the limit (as the service)
        n_samples = min(loaded.spec.default_n_samples, most_samples)
    summary, samples = predictor.uncertainty(
        x,
        n_samples,
        seed=seed,
        level=args.level,
        return_samples=args.return_samples,
        tolerance=tolerance,
        max_n_samples=most,
    )
    return convert.uncertainty_response(
        predictor,
        summary,
        samples,
        seed=seed,
        level=args.level,
        tolerance=tolerance if auto else None,
        max_n_samples=most if auto else None,
        decision=decision,
    )


def _max_n_samples() -> int:
    """The service's ``max_n_samples`` (``MCDROP_MAX_N_SAMPLES``, else its default)."""
    from pydantic import ValidationError

    try:
        return Settings().max_n_samples
    except ValidationError as exc:  # one line per setting, not pydantic's report
        raise UsageError(_errors(exc)) from None


def _n_samples(value: str) -> int | str:
    """``--n-samples``: a positive integer, or ``auto``."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return number


def _positive(value: str) -> int:
    """A count or size flag: an integer of at least 1 (argparse's usage error otherwise)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _index(value: str) -> int:
    """A class index flag: an integer of at least 0."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a class index (0, 1, ...), got {value!r}")
    return number


def _url(args: argparse.Namespace) -> str:
    return args.url or os.environ.get(URL_ENV) or DEFAULT_URL


def _client(args: argparse.Namespace) -> Client:
    """The service's client for ``--url`` and ``--timeout`` (else the client's default)."""
    from service.client import Client

    return Client(_url(args), **({} if args.timeout is None else {"timeout": args.timeout}))


def _seconds(value: str) -> float:
    """``--timeout``: seconds, a finite number > 0 and at most the client's MAX_TIMEOUT."""
    from mcdrop_client.client import MAX_TIMEOUT

    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT:  # also NaN
        raise argparse.ArgumentTypeError(
            f"expected seconds, a number > 0 and at most {MAX_TIMEOUT:.0f} (a year), got {value!r}"
        )
    return seconds


_URL_HELP = (
    f"service URL (default: ${URL_ENV}, else {DEFAULT_URL}); an API key is read from "
    "$MCDROP_API_KEY"
)
# The client's DEFAULT_TIMEOUT and MAX_TIMEOUT (importing them here would load the HTTP client
# for every command: a test holds them equal).
_TIMEOUT_HELP = (
    "seconds a request to the service may take in all: connecting, sending, and reading the "
    "complete answer (default: 75, longer than the service's own 60 s deadline; at most "
    "31536000, a year)"
)


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for info in client.models():
            # A service's names and descriptions are its own: one line each, as a terminal
            # shows it (no line breaks or escape sequences of the service's).
            line = f"{info.name:12} {info.task:15} input {info.input_shape}  {info.description}"
            print(_one_line(line))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="mcdrop",
        description="MC-dropout uncertainty service",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve the models of a folder over HTTP",
        description="Flags override MCDROP_* environment variables.",
    )
    _add_setting_flags(serve, Settings)
    serve.set_defaults(func=_serve)

    train = sub.add_parser("train", help="train a model with dropout and write a model directory")
    train.add_argument("dataset", choices=["digits", "diabetes", "fashion"])
    train.add_argument("--out", type=Path, required=True, help="model directory to write")
    train.add_argument("--arch", choices=["mlp", "cnn", "row_lstm"], default="mlp")
    train.add_argument(
        "--hidden",
        type=_positive,
        nargs="+",
        default=[128, 128],
        help="MLP hidden widths; the first is the CNN's hidden layer and the RowLSTM's state",
    )
    train.add_argument("--dropout", type=float, default=0.1)
    train.add_argument(
        "--kind", choices=["standard", "alpha", "dropconnect"], default="standard", help="MLP only"
    )
    train.add_argument(
        "--channels", type=_positive, nargs="+", default=[16, 32, 32], help="CNN only"
    )
    train.add_argument(
        "--spatial-dropout", type=float, default=0.0, help="CNN: Dropout2d rate after each conv"
    )
    train.add_argument(
        "--train-size", type=_positive, default=None, help="train on the first N training rows only"
    )
    train.add_argument(
        "--exclude-classes",
        type=_index,
        nargs="+",
        default=[],
        help="leave these classes out of training (for out-of-distribution tests)",
    )
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--epochs", type=_positive, default=100)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=_positive, default=64)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--n-samples",
        type=_positive,
        default=100,
        help="MC samples for evaluation and the model's default",
    )
    train.add_argument(
        "--threads", type=_positive, default=1, help="torch threads (1: reproducible)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a model directory on a dataset: calibration, OOD detection, plots",
        description="Writes report.json, report.md and PNG plots into --out.",
    )
    evaluate.add_argument("model_dir", type=Path, help="model directory (model.json + weights)")
    evaluate.add_argument(
        "--dataset",
        choices=["digits", "diabetes", "fashion"],
        default=None,
        help="default: the dataset the model was trained on",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="folder for the report and plots")
    evaluate.add_argument(
        "--n-samples", type=_positive, default=None, help="default: the model's default_n_samples"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the MC samples and noise")
    evaluate.add_argument(
        "--ood-classes",
        type=_index,
        nargs="+",
        default=None,
        help="classes the model never saw (default: the manifest's training.exclude_classes)",
    )
    evaluate.add_argument("--limit", type=_positive, default=None, help="score only N rows per set")
    evaluate.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    evaluate.add_argument("--threads", type=_positive, default=1, help="torch threads")
    _add_setting_flags(evaluate, ModelSettings)
    evaluate.set_defaults(func=_evaluate)

    calibrate = sub.add_parser(
        "calibrate",
        help="compute a model's rejection thresholds and conformal quantiles on held-out rows",
        description="Writes MODEL_DIR/calibration.json: the sorted uncertainty scores and "
        "conformal scores of held-out rows, from which requests get reject flags "
        '("reject_rate") and conformal sets or intervals ("coverage"). The rows: --data, or '
        "the validation split of the built-in dataset the model was trained on.",
    )
    calibrate.add_argument("model_dir", type=Path, help="model directory (model.json + weights)")
    calibrate.add_argument(
        "--data",
        type=Path,
        default=None,
        help="held-out rows: an .npz with arrays x (N, *input_shape) and y (class indices (N,) "
        "or targets (N, K)) the model never trained on",
    )
    calibrate.add_argument(
        "--n-samples", type=_positive, default=None, help="default: the model's default_n_samples"
    )
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the MC samples")
    calibrate.add_argument(
        "--report",
        action="store_true",
        help="also check the decisions on the recorded dataset's test split",
    )
    calibrate.add_argument("--json", action="store_true", help="the summary as JSON")
    calibrate.add_argument("--threads", type=_positive, default=1, help="torch threads")
    _add_setting_flags(calibrate, ModelSettings)
    calibrate.set_defaults(func=_calibrate)

    check = sub.add_parser(
        "check",
        help="what MC sampling will do with a model directory, and what is wrong with it",
        description="Loads a model directory, samples a few example rows and reports the "
        "dropout found and its calls, whether samples vary, whether the prefix is shared, the "
        "cost of one sample and the problems. Exit status 1 when a problem makes MC dropout "
        "meaningless on the model.",
    )
    check.add_argument("model_dir", type=Path, help="model directory (model.json + weights)")
    check.add_argument("--json", action="store_true", help="the report as JSON")
    # The bounds are mcdrop.checking's MAX_SAMPLES and MAX_ROWS, which check() holds the flags
    # to (importing them here would load torch for every command: a test holds the two equal).
    check.add_argument(
        "--n-samples",
        type=_positive,
        default=16,
        help="samples of every example row (at most 10_000)",
    )
    check.add_argument(
        "--rows",
        type=_positive,
        default=4,
        help="example rows (drawn from the model's examples.safetensors where it has one, "
        "else random; at most 64)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the rows and samples")
    _add_setting_flags(check, ModelSettings)
    check.set_defaults(func=_check)

    predict = sub.add_parser(
        "predict",
        help="predict with a running service or a local model",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("model", help="model name")
    predict.add_argument(
        "--inputs", required=True, help="JSON list of rows, @file.json, or - for standard input"
    )
    where = predict.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=_URL_HELP)
    where.add_argument("--model-dir", type=Path, help="predict locally from this models folder")
    predict.add_argument("--timeout", type=_seconds, default=None, help=_TIMEOUT_HELP)
    predict.add_argument("--uncertainty", action="store_true", help="MC-dropout uncertainty")
    predict.add_argument(
        "--n-samples",
        type=_n_samples,
        default=None,
        help="samples per row, or auto: each row until its MC standard error is within "
        "--tolerance or it has --max-n-samples (default 1000)",
    )
    predict.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="with --n-samples auto: the MC standard error at which a row stops; a classifier's "
        "in probability (default 0.01), a regressor's (of its mean and std) in units of its "
        "predictive std (default 0.05)",
    )
    predict.add_argument(
        "--max-n-samples", type=_positive, default=None, help="with --n-samples auto"
    )
    predict.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the MC samples: the same seed, the same answer (default: a fresh one, "
        "which the answer reports)",
    )
    predict.add_argument(
        "--level",
        type=float,
        default=0.95,
        help="a regressor's central interval lower/upper at this level (default 0.95)",
    )
    predict.add_argument(
        "--return-samples",
        action="store_true",
        help="add each row's samples (S sampled probabilities or means) to the answer",
    )
    decide = predict.add_argument_group("decisions, with --uncertainty (a calibrated model)")
    decide.add_argument(
        "--reject-rate", type=float, default=None, help="flag rows as the calibration rejects"
    )
    decide.add_argument("--reject-threshold", type=float, default=None, help="or flag above this")
    decide.add_argument("--reject-score", default=None, help="the score to flag on")
    decide.add_argument(
        "--coverage", type=float, default=None, help="conformal sets or intervals at this coverage"
    )
    _add_setting_flags(predict.add_argument_group("with --model-dir"), ModelSettings)
    predict.set_defaults(func=_predict)

    models = sub.add_parser("models", help="list the models of a running service")
    models.add_argument("--url", default=None, help=_URL_HELP)
    models.add_argument("--timeout", type=_seconds, default=None, help=_TIMEOUT_HELP)
    models.set_defaults(func=_models)
    return root


def _refused(exc: Exception) -> str | None:
    """What to say of ``exc`` where it refuses the request as the caller's to fix (exit status
    2), the same whether a local model or a service refused it: a command line to fix, a 4xx
    answer of the service, or locally what the service answers with a 4xx (inputs or options
    mcdrop refuses, values the model's own forward raises on: ``model_rejected_input``, in the
    service's words); None for any other error."""
    from service.client import APIError, InvalidRequestError, InvalidURLError

    if isinstance(exc, UsageError | InvalidURLError | InvalidRequestError):
        return str(exc)
    if isinstance(exc, APIError):
        if exc.status_code == 401:  # the service's words fit any client: how this one sends a key
            key = "MCDROP_API_KEY"
            how = (
                f"{key} holds the key mcdrop sent"
                if os.environ.get(key)
                else f"set {key} to the service's key: mcdrop sends it"
            )
            return f"{exc}; {how}"
        refused = 400 <= exc.status_code < 500 and exc.status_code not in TRANSIENT_STATUSES
        return str(exc) if refused else None
    if "mcdrop" not in sys.modules:  # the library never ran (--url): none of its errors
        return None
    from mcdrop.exceptions import InvalidArgumentError, InvalidInputError
    from mcdrop.model_errors import raised_by_model

    if isinstance(exc, InvalidInputError | InvalidArgumentError):
        return str(exc)
    if raised_by_model(exc):
        from service.errors import rejected_message

        return rejected_message(exc, "these inputs")
    return None


def _failed(exc: Exception) -> str | None:
    """What to say of ``exc``, an expected failure that is not the request's (exit status 1):
    the service's (a 5xx answer), the network's, a model directory's, the machine's (out of
    memory, a device error, even inside the model's forward, as the service's 500); None for
    anything else, a bug, whose traceback says more."""
    from service.client import ClientError

    if isinstance(exc, ClientError | OSError):
        return str(exc)
    if "mcdrop" in sys.modules:
        from mcdrop.exceptions import McDropError
        from mcdrop.model_errors import server_side

        if server_side(exc):
            from service.errors import first_line

            said = first_line(exc)
            return (
                f"the machine failed running the model ({type(exc).__name__}"
                f"{': ' + said if said else ''}): out of memory or a device error, not the "
                "inputs' values; fewer rows or samples at a time need less memory"
            )
        if isinstance(exc, McDropError):
            return str(exc)
    return str(exc) if isinstance(exc, ValueError) else None


#: Most characters of an error line: a service's message (``--url``) is of any length.
MAX_ERROR_CHARS = 2000


def _one_line(text: str) -> str:
    """``text`` as one line that a terminal shows as written: its control characters escaped
    (a service's message may hold line breaks, or escape sequences a terminal would run), cut to
    :data:`MAX_ERROR_CHARS`."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(line) <= MAX_ERROR_CHARS:
        return line
    return f"{line[:MAX_ERROR_CHARS]}... ({len(line)} characters)"


def main(argv: list[str] | None = None) -> int:
    """Run the command; errors are one line on standard error, never a traceback, with the exit
    status of :data:`EXIT_STATUS`: 2 for a request refused as the caller's to fix, 1 for any
    other failure (a transient refusal, 408 or 429, among them)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv  # recorded in model manifests as the command that made them
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a reader that is gone is caught, not at exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mcdrop predict ... | head`: the reader has all it wants
        _drop_output()
        return CLOSED_OUTPUT
    except Exception as exc:  # one clear line instead of a traceback for expected failures
        said = _refused(exc)
        if said is not None:  # argparse's form, as its own usage errors (also exit 2)
            print(f"mcdrop {args.command}: error: {_one_line(said)}", file=sys.stderr)
            return 2
        said = _failed(exc)
        if said is not None:
            print(f"mcdrop: error: {_one_line(said)}", file=sys.stderr)
            return 1
        raise


def _drop_output() -> None:
    """Standard output to /dev/null: what Python still holds for it is flushed at exit, and a
    flush into the closed pipe would print "Exception ignored ... BrokenPipeError"."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured, replaced): nothing held
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())

"""Model directories: round trip, no pickle, and errors that name the file and the problem."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import mcdrop.nets
from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec, Normalization
from mcdrop.exceptions import CheckpointError, UntrustedCodeError
from mcdrop.nets import MLP
from tests.conftest import MODELS


def _spec(**changes: object) -> ModelSpec:
    base = {
        "name": "tiny",
        "task": "regression",
        "input_shape": [3],
        "labels": ["y"],
        "architecture": {
            "name": "mlp",
            "params": {"in_features": 3, "hidden": [8], "out_features": 1, "dropout": 0.2},
        },
        "tau": 4.0,
        "input_normalization": Normalization([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]),
        "target_normalization": Normalization([10.0], [5.0]),
    }
    return ModelSpec(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MLP]:
    torch.manual_seed(0)
    net = MLP(3, [8], 1, dropout=0.2)
    checkpoint.save(tmp_path / "tiny", _spec(), net)
    return tmp_path / "tiny", net


def test_round_trip_applies_normalisation(saved: tuple[Path, MLP]) -> None:
    path, net = saved
    loaded = checkpoint.load(path)
    assert loaded.spec == _spec()
    assert not any(m.training for m in loaded.module.modules())
    x = torch.randn(4, 3)
    expected = net.eval()((x - torch.tensor([1.0, 2, 3])) / torch.tensor([1.0, 2, 4])) * 5 + 10
    assert torch.allclose(loaded.module(x), expected, atol=1e-6)


def test_weights_are_safetensors_not_pickle(saved: tuple[Path, MLP]) -> None:
    raw = (saved[0] / checkpoint.WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "layers.0.weight" in header
    assert b"\x80\x04" not in raw[:2]  # no pickle protocol marker


@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_bundled_models_load(name: str) -> None:
    loaded = checkpoint.load(MODELS / name)
    assert loaded.spec.name == name
    assert loaded.spec.metrics


def _broken(tmp_path: Path, saved: tuple[Path, MLP], edit) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(saved[0], target)
    edit(target)
    return target


def _edit_manifest(**changes: object):
    def edit(path: Path) -> None:
        data = json.loads((path / checkpoint.MANIFEST).read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (path / checkpoint.MANIFEST).write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: (p / checkpoint.MANIFEST).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / checkpoint.MANIFEST).unlink(), "no manifest"),
        (lambda p: (p / checkpoint.WEIGHTS).unlink(), "weights file is missing"),
        (lambda p: (p / checkpoint.WEIGHTS).write_bytes(b"\x00garbage" * 10), "safetensors"),
        (_edit_manifest(task="ranking"), "'task'"),
        (_edit_manifest(labels=None), "missing field"),
        (_edit_manifest(surprise=1), "unknown field"),
        (_edit_manifest(tau=-1), "'tau'"),
        (_edit_manifest(input_shape=[0]), "input_shape"),
        (_edit_manifest(architecture={"name": "resnet"}), "unknown architecture"),
        (
            _edit_manifest(
                architecture={
                    "name": "mlp",
                    "params": {"in_features": 3, "hidden": [9], "out_features": 1},
                }
            ),
            "does not match",
        ),
        (_edit_manifest(architecture={"name": "mlp", "params": {"width": 3}}), "do not fit"),
        (
            _edit_manifest(architecture={"factory": "nowhere.at.all:make"}),
            "MCDROP_TRUST_MODEL_CODE",
        ),
        (_edit_manifest(input_normalization={"mean": [1, 2], "std": [1, 2, 3]}), "differ"),
        (_edit_manifest(input_normalization={"mean": [1, 2, 3], "std": [1, 0, 3]}), "positive"),
        # Every field's type is checked at load, not when a response is built from it.
        (_edit_manifest(description=5), "'description' must be a string"),
        (_edit_manifest(version=1), r"'version' must be a non-empty string .* got 1$"),
        (_edit_manifest(version="a/b"), "'version' must be a non-empty string without '/'"),
        (_edit_manifest(version=""), "'version'"),
        (_edit_manifest(dropout="x"), r"'dropout' must be a number in \[0, 1\)"),
        (_edit_manifest(dropout=1.5), "'dropout'"),
        (_edit_manifest(tau=True), "'tau' must be a positive number, got True"),
        (_edit_manifest(task="classification", labels=["yes"]), "at least 2 labels"),
        (_edit_manifest(metrics={"rmse": "high"}), "'metrics.rmse' must be a finite number"),
        (_edit_manifest(metrics={"rmse": float("nan")}), "'metrics.rmse' .* got nan"),
        (_edit_manifest(metrics={"rmse": float("inf")}), "'metrics.rmse' .* got inf"),
        (_edit_manifest(metrics={"rmse": True}), "'metrics.rmse'"),
        (_edit_manifest(metrics=[1.0]), "'metrics' must be an object"),
        (_edit_manifest(training="yes"), "'training' must be an object"),
        (_edit_manifest(default_n_samples=True), "'default_n_samples'"),
        # Refused, not capped silently at the service's max_n_samples.
        (
            _edit_manifest(default_n_samples=10**30),
            r"'default_n_samples' must be an integer from 1 to 1_000_000, got 10{30}$",
        ),
        (_edit_manifest(default_n_samples=1_000_001), "from 1 to 1_000_000, got 1000001"),
        (_edit_manifest(default_n_samples=10**60), "got an integer of more than 38 digits"),
        (_edit_manifest(format_version=True), "format_version True"),
        # Normalisation that cannot apply to the model's rows or outputs.
        (_edit_manifest(input_shape=[4]), r"input_normalization has shape \[3\], .* \[4\]"),
        (_edit_manifest(target_normalization={"mean": [1, 2], "std": [1, 2]}), "one per label"),
        (_edit_manifest(target_normalization={"mean": [0], "std": [1e38]}), "too large"),
        (_edit_manifest(input_normalization={"mean": [1, 2, 3], "std": [1, 1e39, 3]}), "finite"),
    ],
)
def test_errors_name_file_and_problem(tmp_path: Path, saved, edit, message: str) -> None:
    target = _broken(tmp_path, saved, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(target)
    assert str(target) in str(info.value)


def test_a_number_version_is_refused_not_served_as_another_type(saved) -> None:
    """A version is a string everywhere (the v2 path compares strings): 1 would load as an int
    that no request could name ("has no version '1'; versions: [1]")."""
    data = {**_spec().to_dict(), "version": 1}
    with pytest.raises(CheckpointError, match='write "1", not 1'):
        ModelSpec.from_dict(data)
    assert checkpoint.load(saved[0]).spec.version == "1"


@pytest.mark.parametrize(
    "nested", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000]
)
@pytest.mark.parametrize("name", [checkpoint.MANIFEST, "calibration.json"])
def test_json_nested_too_deeply_names_the_file(
    tmp_path: Path, saved, name: str, nested: str
) -> None:
    target = _broken(tmp_path, saved, lambda p: (p / name).write_text(nested))
    with pytest.raises(CheckpointError, match="not valid JSON: nested too deeply") as info:
        checkpoint.load(target)
    assert str(target / name) in str(info.value)


def _replace_with_link(name: str, to: str):
    def edit(path: Path) -> None:
        (path / name).unlink(missing_ok=True)
        (path / name).symlink_to(to)

    return edit


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
@pytest.mark.parametrize(
    ("edit", "name"),
    [
        (_replace_with_link(checkpoint.WEIGHTS, "/dev/zero"), checkpoint.WEIGHTS),
        (_replace_with_link(checkpoint.MANIFEST, "/dev/zero"), checkpoint.MANIFEST),
        (_replace_with_link("calibration.json", "/dev/zero"), "calibration.json"),
        (_replace_with_link(checkpoint.EXAMPLES, "/dev/zero"), checkpoint.EXAMPLES),
        (lambda p: ((p / checkpoint.WEIGHTS).unlink(), (p / checkpoint.WEIGHTS).mkdir()), "w"),
    ],
)
def test_a_file_that_is_not_a_regular_file_is_named_so(
    tmp_path: Path, saved, edit, name: str
) -> None:
    """Not "missing": it is there, and reading it would never end (/dev/zero) or fail."""
    target = _broken(tmp_path, saved, edit)
    with pytest.raises(CheckpointError, match="is not a regular file") as info:
        checkpoint.load(target)
    assert str(target) in str(info.value)


def test_weights_that_do_not_fit_are_refused_before_the_architecture_is_allocated(
    tmp_path: Path, saved
) -> None:
    """A manifest of a few bytes asking for 160 GB of float32 weights ([200000, 200000]): the
    file's header shapes are compared with the architecture's before any of it exists (else
    the allocation itself fails, or takes the machine's memory)."""
    arch = {
        "name": "mlp",
        "params": {"in_features": 3, "hidden": [200_000, 200_000], "out_features": 1},
    }
    target = _broken(tmp_path, saved, _edit_manifest(architecture=arch))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(target)
    message = str(info.value)
    assert message.startswith(f"{target / checkpoint.WEIGHTS}: does not match the architecture")
    assert "'layers.0.weight' is [8, 3] in the file, [200000, 3] in the architecture" in message
    assert "tensors the file lacks: 'layers." in message


BUILT_INS: dict[str, tuple[dict[str, Any], str, int]] = {
    # name: (params, the param to double, input features)
    "mlp": ({"in_features": 3, "hidden": [8], "out_features": 2}, "out_features", 3),
    "mlp dropconnect": (
        {"in_features": 3, "hidden": [8], "out_features": 2, "kind": "dropconnect"},
        "out_features",
        3,
    ),
    "cnn": ({"image_size": 8, "channels": [4], "pool": [True], "hidden": 6}, "hidden", 64),
    "row_lstm": ({"in_features": 4, "hidden": 5}, "hidden", 16),
}


@pytest.mark.parametrize("case", sorted(BUILT_INS))
def test_every_builtin_is_checked_against_the_header_before_it_is_built(
    tmp_path: Path, case: str
) -> None:
    """Each built-in builds on the meta device, so its shapes are compared before allocation
    (the message is the header check's, not torch's "size mismatch"); the right ones load."""
    params, grown, features = BUILT_INS[case]
    arch = {"name": case.split()[0], "params": params}
    spec = _spec(
        architecture=arch,
        task="classification",
        input_shape=[features] if case != "cnn" else [1, 8, 8],
        labels=["a", "b"] if case.startswith("mlp") else [str(i) for i in range(10)],
        input_normalization=None,
        target_normalization=None,
        tau=None,
    )
    net = mcdrop.nets.build(arch)
    checkpoint.save(tmp_path / "m", spec, net)
    assert checkpoint.load(tmp_path / "m").spec == spec
    bigger = {**arch, "params": {**params, grown: 2 * params[grown]}}
    _edit_manifest(architecture=bigger)(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"in the file, .* in the architecture"):
        checkpoint.load(tmp_path / "m")


def test_weights_with_a_tensor_the_architecture_lacks(tmp_path: Path, saved) -> None:
    def extra(path: Path) -> None:
        state = safetensors.torch.load_file(path / checkpoint.WEIGHTS)
        state["surplus"] = torch.zeros(2)
        safetensors.torch.save_file(state, path / checkpoint.WEIGHTS)

    with pytest.raises(CheckpointError, match="tensors the architecture lacks: 'surplus'"):
        checkpoint.load(_broken(tmp_path, saved, extra))


def test_trusted_factory_that_is_not_there(tmp_path: Path, saved) -> None:
    edit = _edit_manifest(architecture={"factory": "nowhere.at.all:make"})
    target = _broken(tmp_path, saved, edit)
    with pytest.raises(CheckpointError, match="cannot import") as info:
        checkpoint.load(target, trust_model_code=True)
    assert str(target) in str(info.value)


FACTORY_MODULE = """
from torch import nn

def make(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.Dropout(0.5), nn.Linear(width, 1))
"""


def test_user_factory_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec(architecture={"factory": "my_nets:make", "params": {"width": 5}})
    from my_nets import make  # type: ignore[import-not-found]

    checkpoint.save(tmp_path / "custom", spec, make(5))
    loaded = checkpoint.load(tmp_path / "custom", allowed_factories=["my_nets"])
    assert loaded.module(torch.randn(2, 3)).shape == (2, 1)
    sys.modules.pop("my_nets", None)


def test_homoscedastic_regressor_needs_tau() -> None:
    with pytest.raises(CheckpointError, match="tau"):
        ModelSpec.from_dict({**_spec().to_dict(), "tau": None})


# A model directory is data: loading it runs no code unless the caller trusts it.


class _Mkdir:
    """Unpickling this creates the directory ``marker``: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.marker,)


HUBCONF = """import os
os.mkdir({marker!r})

def net():
    return None
"""


@pytest.fixture
def planted(tmp_path: Path, saved: tuple[Path, MLP]) -> tuple[Path, Path]:
    """A loadable model directory with code planted next to its manifest: pickles under the
    usual weight names and a torch.hub ``hubconf.py``, each creating ``marker`` when run."""
    target, marker = tmp_path / "planted", tmp_path / "marker"
    shutil.copytree(saved[0], target)
    torch.save(_Mkdir(marker), target / "weights.pt")
    for name in ("model.pkl", "pytorch_model.bin"):
        (target / name).write_bytes(pickle.dumps(_Mkdir(marker)))
    (target / "hubconf.py").write_text(HUBCONF.format(marker=str(marker)))
    return target, marker


def test_loading_unpickles_nothing(planted: tuple[Path, Path]) -> None:
    target, marker = planted
    assert checkpoint.load(target).spec.name == "tiny"
    assert not marker.exists()
    # The planted pickle is live: loading it would have run it.
    torch.load(target / "weights.pt", weights_only=False)
    assert marker.is_dir()


def _code_factories(target: Path, marker: Path) -> dict[str, dict[str, object]]:
    """Factories that run code, each with the params that would create ``marker``."""
    return {
        "os:system": {"command": f"mkdir {marker}"},
        "subprocess:run": {"args": ["mkdir", str(marker)]},
        "torch:load": {"f": str(target / "weights.pt"), "weights_only": False},
        "torch.hub:load": {"repo_or_dir": str(target), "model": "net", "source": "local"},
        "builtins:eval": {"source": f"__import__('os').mkdir({str(marker)!r})"},
    }


@pytest.mark.parametrize(
    "factory", ["os:system", "subprocess:run", "torch:load", "torch.hub:load", "builtins:eval"]
)
def test_factories_that_run_code_need_opt_in(planted: tuple[Path, Path], factory: str) -> None:
    target, marker = planted
    params = _code_factories(target, marker)[factory]
    _edit_manifest(architecture={"factory": factory, "params": params})(target)
    module = factory.partition(":")[0]
    with pytest.raises(UntrustedCodeError) as info:
        checkpoint.load(target, allowed_factories=["mcdrop", "tests"])
    message = str(info.value)
    assert str(target / checkpoint.MANIFEST) in message
    for how in ("MCDROP_TRUST_MODEL_CODE=1", "--trust-model-code", "trust_model_code=True"):
        assert how in message
    assert f"MCDROP_ALLOWED_FACTORIES={module} (flag --allowed-factories {module};" in message
    assert not marker.exists()
    if factory != "builtins:eval":  # eval takes no keyword arguments: it never runs
        # The operator's opt-in does run it (and the load fails: none returns a module).
        with pytest.raises(CheckpointError, match=r"not a torch\.nn\.Module|raised"):
            checkpoint.load(target, trust_model_code=True)
        assert marker.is_dir()


def test_a_builtin_never_imports_a_factory(planted: tuple[Path, Path]) -> None:
    target, marker = planted
    arch = json.loads((target / checkpoint.MANIFEST).read_text())["architecture"]
    factory = {"factory": "os:system", "params": {"command": f"mkdir {marker}"}}
    _edit_manifest(architecture={**arch, **factory, "name": "mlp"})(target)
    with pytest.raises(CheckpointError, match="give one"):
        checkpoint.load(target, trust_model_code=True)
    assert not marker.exists()


@pytest.fixture
def custom(tmp_path: Path) -> Path:
    """A model directory built by ``tests.factories:build``."""
    from tests.factories import build

    spec = _spec(architecture={"factory": "tests.factories:build", "params": {"width": 4}})
    return checkpoint.save(tmp_path / "custom", spec, build(width=4))


@pytest.mark.parametrize("allowed", [["tests"], ["tests."], ["tests.factories"], ["x", "tests"]])
def test_allowed_factories_admit_a_module_and_its_package(custom: Path, allowed) -> None:
    loaded = checkpoint.load(custom, allowed_factories=allowed)
    assert loaded.module(torch.randn(2, 3)).shape == (2, 1)


@pytest.mark.parametrize(
    "allowed", [[], ["test"], ["tests_evil"], ["tests.factories_x"], ["tests.factories.build"]]
)
def test_allowed_factories_refuse_other_modules(custom: Path, allowed) -> None:
    with pytest.raises(UntrustedCodeError, match=r"MCDROP_ALLOWED_FACTORIES=tests\.factories "):
        checkpoint.load(custom, allowed_factories=allowed)


def test_an_allowed_module_cannot_pass_on_foreign_code(tmp_path: Path, custom: Path) -> None:
    marker = tmp_path / "marker"
    arch = {"factory": "tests.factories:run", "params": {"args": ["mkdir", str(marker)]}}
    _edit_manifest(architecture=arch)(custom)
    with pytest.raises(UntrustedCodeError, match="defined in module 'subprocess'"):
        checkpoint.load(custom, allowed_factories=["tests"])
    assert not marker.exists()


ROWS = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 7.5]])


def test_example_inputs_round_trip(tmp_path: Path, saved: tuple[Path, MLP]) -> None:
    """Written as safetensors (no pickle), read at load; a directory without them loads as
    before."""
    _, net = saved
    assert checkpoint.load(saved[0]).example_inputs is None
    checkpoint.save(tmp_path / "ex", _spec(), net, example_inputs=ROWS)
    loaded = checkpoint.load(tmp_path / "ex")
    assert loaded.example_inputs is not None
    assert torch.equal(loaded.example_inputs, ROWS)
    assert loaded.example_inputs.device.type == "cpu"
    assert safetensors.torch.load_file(tmp_path / "ex" / checkpoint.EXAMPLES).keys() == {"inputs"}


def _write_examples(tensors: dict[str, torch.Tensor]):
    def edit(path: Path) -> None:
        safetensors.torch.save_file(tensors, path / checkpoint.EXAMPLES)

    return edit


def _huge_examples(path: Path) -> None:
    """A sparse file of a gigabyte: refused by its size, before a byte of it is read."""
    with (path / checkpoint.EXAMPLES).open("wb") as f:
        f.truncate(2**30)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: (p / checkpoint.EXAMPLES).write_bytes(b"\x80not safetensors"), "not a readable"),
        (lambda p: (p / checkpoint.EXAMPLES).write_bytes(pickle.dumps(ROWS)), "not a readable"),
        (_write_examples({"rows": ROWS}), "must hold one tensor named 'inputs', holds ['rows']"),
        (
            _write_examples({"inputs": ROWS, "x": ROWS.clone()}),
            "must hold one tensor named 'inputs'",
        ),
        (_write_examples({"inputs": ROWS[:, :2].contiguous()}), "got shape [2, 2]"),
        (_write_examples({"inputs": ROWS[0]}), "got shape [3]"),
        (_write_examples({"inputs": ROWS.double()}), "must be float32, got torch.float64"),
        (_write_examples({"inputs": ROWS.long()}), "must be float32, got torch.int64"),
        (_write_examples({"inputs": ROWS * float("nan")}), "must be finite"),
        (_write_examples({"inputs": ROWS[:0]}), "must be 1 to 64 rows, got 0"),
        (_write_examples({"inputs": torch.zeros(65, 3)}), "must be 1 to 64 rows, got 65"),
        (
            _write_examples({"inputs": torch.zeros(1000, 3)}),
            "12_080 bytes, more than 64 example rows of input_shape [3] take (4_864 bytes at most)",
        ),
        (_huge_examples, "1_073_741_824 bytes, more than 64 example rows of input_shape [3]"),
    ],
    ids=[
        "garbage",
        "pickle",
        "other name",
        "two tensors",
        "wrong row shape",
        "no N",
        "float64",
        "int64",
        "NaN",
        "no rows",
        "65 rows",
        "1000 rows",
        "huge",
    ],
)
def test_bad_example_inputs_are_a_load_error_naming_the_file(
    tmp_path: Path, saved: tuple[Path, MLP], edit, message: str
) -> None:
    target = _broken(tmp_path, saved, edit)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(target)
    assert str(info.value).startswith(f"{target / checkpoint.EXAMPLES}: ")
    assert message in str(info.value)


#: Reads a model directory's example rows 3000 times; prints what each read gave.
_READ_EXAMPLES = """
import json, sys, torch
from mcdrop import checkpoint
from mcdrop.exceptions import CheckpointError
spec = checkpoint.read_spec(sys.argv[1])
rows = torch.tensor(json.loads(sys.argv[2]))
seen = set()
for _ in range(3000):
    try:
        x = checkpoint.read_examples(sys.argv[1], spec)
        seen.add("read" if x is not None and torch.equal(x, rows) else "wrong")
    except CheckpointError:
        seen.add("refused")
print(json.dumps(sorted(seen)))
"""


def test_example_inputs_swapped_while_read_are_refused_not_waited_on(tmp_path: Path) -> None:
    """A file swapped between the check that it is a regular file of its size and the read (a
    FIFO, whose open blocks the process until a writer comes; a gigabyte) is refused: it is
    checked and read through one descriptor, opened without waiting, at most the bytes
    allowed. (The reads in a process of their own: a read that waits blocks the interpreter.)"""
    target = tmp_path / "m"
    checkpoint.save(target, _spec(), MLP(3, [8], 1), example_inputs=ROWS)
    good = tmp_path / "good.safetensors"
    shutil.copy(target / checkpoint.EXAMPLES, good)
    fifo, huge, staged = tmp_path / "fifo", tmp_path / "huge", tmp_path / "next"
    os.mkfifo(fifo)
    with huge.open("wb") as f:
        f.truncate(2**30)
    reader = subprocess.Popen(
        [sys.executable, "-c", _READ_EXAMPLES, str(target), json.dumps(ROWS.tolist())],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30  # the reads take ~2 s
    # the good file, then a FIFO, the good file, a gigabyte: each put in place at once
    while reader.poll() is None and time.monotonic() < deadline:
        for swapped in (good, fifo, good, huge):
            os.link(swapped, staged)
            os.replace(staged, target / checkpoint.EXAMPLES)
    if reader.poll() is None:
        reader.kill()
        reader.wait()
        pytest.fail("read_examples waited on a FIFO swapped in (or took 30 s)")
    out, _ = reader.communicate()
    assert reader.returncode == 0
    assert set(json.loads(out)) <= {"read", "refused"}


_LOAD = """
import json, sys
from mcdrop import checkpoint
from mcdrop.exceptions import CheckpointError
seen = set()
for _ in range(300):
    try:
        checkpoint.load(sys.argv[1])
        seen.add("read")
    except CheckpointError:
        seen.add("refused")
print(json.dumps(sorted(seen)))
"""


@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.MANIFEST])
def test_a_file_swapped_for_a_fifo_while_loading_is_refused_not_waited_on(
    tmp_path: Path, name: str
) -> None:
    """The weights and the manifest, as the example rows above: a FIFO swapped in under the
    name after the check that it is a regular file is refused (opened without waiting, checked
    through its descriptor, and the weights read through that descriptor's name), not waited on
    for good."""
    target = tmp_path / "m"
    checkpoint.save(target, _spec(), MLP(3, [8], 1))
    good = tmp_path / "good"
    shutil.copy(target / name, good)
    fifo, staged = tmp_path / "fifo", tmp_path / "next"
    os.mkfifo(fifo)
    loader = subprocess.Popen(
        [sys.executable, "-c", _LOAD, str(target)], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while loader.poll() is None and time.monotonic() < deadline:
        for swapped in (good, fifo):
            os.link(swapped, staged)
            os.replace(staged, target / name)
    if loader.poll() is None:
        loader.kill()
        loader.wait()
        pytest.fail(f"checkpoint.load waited on a FIFO swapped in as {name} (or took 60 s)")
    out, _ = loader.communicate()
    assert loader.returncode == 0
    assert "refused" in json.loads(out)


def test_checkpoint_save_refuses_bad_example_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"\(N, 3\) rows, got shape \[2, 2\]"):
        checkpoint.save(tmp_path / "m", _spec(), MLP(3, [8], 1), example_inputs=ROWS[:, :2])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.EXAMPLES, checkpoint.MANIFEST])
def test_a_symlink_in_the_folder_is_replaced_not_written_through(tmp_path: Path, name: str) -> None:
    """A file of the folder that is a symlink (``weights.safetensors -> /etc/...``): the save
    puts its file in the link's place and leaves the file the link led to as it was, where it
    wrote through the link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the model's")
    target = tmp_path / "m"
    target.mkdir()
    (target / name).symlink_to(victim)
    checkpoint.save(target, _spec(), MLP(3, [8], 1), example_inputs=ROWS)
    assert victim.read_bytes() == b"not the model's"
    assert not (target / name).is_symlink()
    loaded = checkpoint.load(target)
    assert loaded.example_inputs is not None
    assert torch.equal(loaded.example_inputs, ROWS)


def test_saved_files_are_readable_as_a_plain_write_makes_them(tmp_path: Path) -> None:
    """Each file with the mode a plain write gives (0o666 less the umask), so that a server
    running as another user reads them: the weights were written readable by their owner only
    (safetensors 0.8's own file)."""
    plain = tmp_path / "plain"
    plain.write_text("")
    checkpoint.save(tmp_path / "m", _spec(), MLP(3, [8], 1), example_inputs=ROWS)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    want = plain.stat().st_mode & 0o777
    assert modes == dict.fromkeys(
        [checkpoint.WEIGHTS, checkpoint.EXAMPLES, checkpoint.MANIFEST], want
    )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_saved_again_a_file_keeps_the_permissions_and_group_it_had(tmp_path: Path) -> None:
    """Saved again over a model whose files were made readable by others (a server running
    as another user, or in their group), under umask 077, each file is as readable as before
    and of its group, as a write in place leaves it: renamed over, each was the new file's
    0o600, and the server's reload failed."""
    target = tmp_path / "m"
    checkpoint.save(target, _spec(), MLP(3, [8], 1, dropout=0.2), example_inputs=ROWS)
    groups = [g for g in os.getgroups() if g != os.getegid()]
    group = 4321 if os.geteuid() == 0 else (groups[0] if groups else os.getegid())
    for path in target.iterdir():
        path.chmod(0o640)
        os.chown(path, -1, group)
    old = os.umask(0o077)
    try:
        checkpoint.save(target, _spec(), MLP(3, [8], 1, dropout=0.3), example_inputs=ROWS)
    finally:
        os.umask(old)
    got = {p.name: (p.stat().st_mode & 0o777, p.stat().st_gid) for p in target.iterdir()}
    names = [checkpoint.WEIGHTS, checkpoint.EXAMPLES, checkpoint.MANIFEST]
    assert got == dict.fromkeys(names, (0o640, group))


#: Saves another model into a model directory with files limited to 4 KiB (a full disk, as the
#: writes see it: EFBIG), its manifest the one file larger (a long description); prints the
#: error.
_SAVE_TOO_LARGE = """
import resource, signal, sys
import torch
from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec
from mcdrop.nets import MLP
params = {"in_features": 3, "hidden": [8], "out_features": 1, "dropout": 0.2}
spec = ModelSpec(
    name="m", task="regression", input_shape=[3], labels=["y"],
    architecture={"name": "mlp", "params": params}, tau=1.0, description="a" * 8000,
)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save(sys.argv[1], spec, MLP(**params), example_inputs=torch.zeros(2, 3))
except OSError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


#: As _SAVE_TOO_LARGE, the one file larger than 4 KiB the one named (the weights: 256 hidden
#: units; else the manifest: a long description).
_SAVE_ONE_TOO_LARGE = """
import resource, signal, sys
from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec
from mcdrop.nets import MLP
large = sys.argv[2]
hidden = 256 if large == "weights.safetensors" else 8
params = {"in_features": 3, "hidden": [hidden], "out_features": 1, "dropout": 0.2}
spec = ModelSpec(
    name="m", task="regression", input_shape=[3], labels=["y"],
    architecture={"name": "mlp", "params": params}, tau=1.0,
    description="a" * (8000 if large == "model.json" else 10),
)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint.save(sys.argv[1], spec, MLP(**params))
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX's")
@pytest.mark.parametrize("large", [checkpoint.WEIGHTS, checkpoint.MANIFEST])
def test_a_full_disk_is_an_os_error_naming_the_file(tmp_path: Path, large: str) -> None:
    """A write that fails for a full disk is an OSError (the weights' was safetensors' own
    error, naming no file: a traceback of ``mcdrop train``) naming the file it was writing, not
    its hidden temporary file, with its errno (EFBIG here), and saying nothing was changed."""
    saver = subprocess.run(
        [sys.executable, "-c", _SAVE_ONE_TOO_LARGE, str(tmp_path / "m"), large],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert saver.returncode == 3, saver.stderr
    said = saver.stdout.strip()
    assert said.startswith(f"OSError {errno.EFBIG} "), said
    assert f"cannot write {tmp_path / 'm' / large}: " in said
    assert ".tmp" not in said
    assert "disk is full" in said
    assert "nothing in its folder was changed" in said
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == []


#: Saves another model into the folder argv[1]; prints the error.
_SAVE_AGAIN = """
import sys
from mcdrop import checkpoint
from mcdrop.checkpoint import ModelSpec
from mcdrop.nets import MLP
params = {"in_features": 3, "hidden": [8], "out_features": 1, "dropout": 0.3}
spec = ModelSpec(
    name="m", task="regression", input_shape=[3], labels=["y"],
    architecture={"name": "mlp", "params": params}, tau=1.0,
)
try:
    checkpoint.save(sys.argv[1], spec, MLP(**params))
except PermissionError as exc:
    print(exc)
    sys.exit(3)
"""


def _as_a_user() -> list[str] | None:
    """What runs a command bound by files' permissions: nothing but the command for a user;
    for root, setpriv without the capabilities that override them; None where neither can."""
    if sys.platform == "win32":
        return None
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_a_folder_not_writable_is_said_so(tmp_path: Path) -> None:
    """Over a model in a folder whose files are writable but not the folder itself, the save
    says the folder must be writable (a file is renamed over, never written in place), naming
    the file, not the temporary file it could not create; the model is left as it was."""
    prefix = _as_a_user()
    if prefix is None:
        pytest.skip("no way to run without the right to write any folder")
    target = tmp_path / "m"
    checkpoint.save(target, _spec(), MLP(3, [8], 1, dropout=0.2))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    target.chmod(0o555)
    try:
        saver = subprocess.run(
            [*prefix, sys.executable, "-c", _SAVE_AGAIN, str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        target.chmod(0o755)
    assert saver.returncode == 3, saver.stderr
    said = saver.stdout
    assert f"cannot write {target / checkpoint.WEIGHTS}: " in said
    assert f"{target} must be writable" in said
    assert ".tmp" not in said
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX's")
@pytest.mark.parametrize("earlier", [True, False], ids=["over a model", "a new folder"])
def test_a_save_that_fails_midway_leaves_the_folder_as_it_was(
    tmp_path: Path, earlier: bool
) -> None:
    """A write that fails part of the way (a full disk: here a file size limit) leaves every
    file as it was, and no temporary file: the earlier model still loads, whole; a new folder
    holds nothing a loader would take for a model. (The manifest was written in place, after
    the new weights: cut short, it was a folder no server loads, saying 'not valid JSON'.)"""
    target = tmp_path / "m"
    target.mkdir()
    if earlier:
        checkpoint.save(target, _spec(), MLP(3, [8], 1, dropout=0.2))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    saver = subprocess.run(
        [sys.executable, "-c", _SAVE_TOO_LARGE, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert saver.returncode == 3, saver.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    if earlier:
        assert checkpoint.load(target).spec == _spec()

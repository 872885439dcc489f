"""Plans kept for calls given none (mcdrop.plan_cache): a call makes its model's plan once for
rows of one shape and dtype; later calls give the samples a fresh plan gives, also after the
model changed; a kept plan neither keeps the model alive nor travels with a copy of it."""

from __future__ import annotations

import copy
import gc
import io
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop import adaptive, plan, plan_cache, predict, sample, sample_chunks
from mcdrop.exceptions import InvalidArgumentError, UnsupportedModelError
from mcdrop.plan_cache import MAX_EVAL_KEYS, MAX_PLANS
from tests.factories import DropsFor, Watched, never
from tests.mcdrop.test_fast_pass import EncoderClassifier


class Counting(nn.Module):
    """A forward of its own that counts its runs; ``extra`` adds an ``F.dropout`` call (an
    attribute the module tree does not show)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)
        self.drop = nn.Dropout(p)
        self.extra = False
        self.runs: list[None] = []  # (an int set anew on every run would make a plan every call)

    @property
    def forwards(self) -> int:
        return len(self.runs)

    def forward(self, x: Tensor) -> Tensor:
        self.runs.append(None)
        h = self.drop(torch.relu(self.a(x.flatten(1)[:, :4].float())))
        if self.extra:
            h = F.dropout(h, 0.2, self.training)
        return self.b(h)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _chain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _channels() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Flatten(), nn.Linear(4 * 25, 2)
    )


# (model, one row's shape): a layer chain, routed modules (and functions), an encoder's direct
# run, the torch-function mode, channel dropout
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "chain": (_chain, (4,)),
    "own forward": (Counting, (4,)),
    "encoder": (EncoderClassifier, (5, 8)),
    "lstm": (Recurrent, (6, 4)),
    "channels": (_channels, (1, 5, 5)),
}


@pytest.fixture(params=sorted(MODELS))
def model_and_shape(request: pytest.FixtureRequest) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    make, shape = MODELS[request.param]
    return make().eval(), shape


def test_a_call_given_no_plan_makes_one_once() -> None:
    model = Counting().eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    planned = model.forwards
    assert planned > 1  # the probe's passes and the call's
    for n_samples in (1, 8, 100):
        before = model.forwards
        sample(model, torch.randn(2, 4), n_samples, seed=1)
        assert model.forwards == before + 1  # one pass, no probe
    before = model.forwards
    sample(model, torch.randn(2, 6), 8, seed=1)  # rows of another shape: a plan of their own
    assert model.forwards == before + planned
    before = model.forwards
    sample(model, torch.randn(2, 4).double(), 8, seed=1)  # and of another dtype
    assert model.forwards == before + planned


def test_sample_chunks_and_adaptive_sampling_plan_once() -> None:
    model = Counting().eval()
    x = torch.randn(3, 4)
    list(sample_chunks(model, x, 4, seed=0))
    before = model.forwards
    assert len(list(sample_chunks(model, x, 4, seed=0))) == 1
    assert model.forwards == before + 1
    before = model.forwards
    rounds = list(
        adaptive.sample_chunks_until(
            model,
            x,
            lambda rows: torch.full((rows.numel(),), 1.0),
            tolerance=1e-9,
            max_n_samples=64,
            seed=0,
        )
    )
    assert model.forwards == before + len(rounds)  # every round one pass, none a probe


def test_kept_plans_give_the_samples_a_fresh_plan_gives(
    model_and_shape: tuple[nn.Module, tuple[int, ...]],
) -> None:
    model, shape = model_and_shape
    sample(model, torch.randn(3, *shape), 8, seed=0)  # kept from rows of the same shape
    for n, n_samples in ((1, 1), (2, 16), (5, 40)):
        x = torch.randn(n, *shape)
        fresh = sample(model, x, n_samples, seed=4, plan=plan(model, x))
        assert torch.equal(sample(model, x, n_samples, seed=4), fresh)
        chunks = list(sample_chunks(model, x, n_samples, seed=4, max_pass_rows=7))
        kept = torch.cat([c.values for c in chunks]) if chunks[0].rows == slice(0, n) else None
        if kept is not None:
            assert torch.allclose(kept, fresh, atol=1e-6)


class BatchSized(nn.Module):
    """A layer whose output depends on the batch's size: before the first dropout, the layers
    cannot run once per row (the plan's prefix check finds it)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * x.shape[0]


def _changes() -> dict[str, Callable[[nn.Sequential], None]]:
    def swap(m: nn.Sequential) -> None:
        m[0] = nn.Linear(4, 16)

    def swap_for_one_the_prefix_cannot_share(m: nn.Sequential) -> None:
        m[1] = BatchSized()

    def forward_set_on_an_instance(m: nn.Sequential) -> None:
        relu = m[1]
        relu.forward = lambda x: torch.relu(x) * x.shape[0]  # type: ignore[method-assign]

    def hook_the_prefix_cannot_share(m: nn.Sequential) -> None:
        m[0].register_forward_hook(lambda module, args, out: out * out.shape[0])

    def residual_across_the_dropout_by_hooks(m: nn.Sequential) -> None:
        # the prefix's output added after the dropout: shared, it has N rows, not S·N
        seen: dict[str, Tensor] = {}
        m[1].register_forward_hook(lambda module, args, out: seen.update(h=out))
        m[3].register_forward_pre_hook(lambda module, args: (args[0] + seen["h"],))

    def append(m: nn.Sequential) -> None:
        m.append(nn.Dropout(0.5))

    def insert_first(m: nn.Sequential) -> None:
        m.insert(0, nn.Dropout(0.4))

    def rate_from_zero(m: nn.Sequential) -> None:
        m[2].p = 0.5

    changes = (
        swap,
        swap_for_one_the_prefix_cannot_share,
        forward_set_on_an_instance,
        hook_the_prefix_cannot_share,
        residual_across_the_dropout_by_hooks,
        append,
        insert_first,
        rate_from_zero,
    )
    return {f.__name__: f for f in changes}


@pytest.mark.parametrize("change", sorted(_changes()))
def test_a_changed_model_samples_as_with_a_fresh_plan(change: str) -> None:
    torch.manual_seed(0)
    model = _chain().eval()
    if change == "rate_from_zero":
        model[2].p = 0.0
        model.append(nn.Dropout(0.1))  # a model with no stochastic call cannot be planned
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    _changes()[change](model)
    made = plan(model, x)
    fresh = sample(model, x, 8, seed=2, plan=made)
    if "prefix" in change or "forward" in change:
        assert not made.prefix  # so a plan kept from before the change would be wrong
    assert torch.equal(sample(model, x, 8, seed=2), fresh)
    assert torch.equal(torch.cat([c.values for c in sample_chunks(model, x, 8, seed=2)]), fresh)


@pytest.mark.parametrize("rows", [1, 3])
def test_hooks_added_or_removed_make_a_new_plan(rows: int) -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(rows, 4)

    def batch_sized(module: nn.Module, args: tuple[Tensor], out: Tensor) -> Tensor:
        return out * out.shape[0] if module is model.a else out

    def agree() -> None:
        made = plan(model, x)
        fresh = sample(model, x, 8, seed=2, plan=made)
        assert torch.equal(sample(model, x, 8, seed=2), fresh)
        assert torch.equal(next(iter(sample_chunks(model, x, 8, seed=2))).values, fresh)

    sample(model, x, 8, seed=0)
    handle = model.a.register_forward_hook(batch_sized)
    agree()  # a plan kept from before would share the prefix
    handle.remove()
    agree()  # and one kept with the hook would not
    handle = torch.nn.modules.module.register_module_forward_hook(batch_sized)
    try:
        agree()
    finally:
        handle.remove()
    agree()


@pytest.mark.parametrize("kind", ["_global_forward_pre_hooks", "_global_forward_hooks"])
def test_global_hooks_set_as_a_dict_anew_make_a_new_plan(kind: str) -> None:
    """torch's dicts of hooks for every module replaced (not changed in place) by one with a
    hook the prefix cannot share: torch calls the new dict's."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)

    def batch_sized(module: nn.Module, *args: object) -> object:
        if module is not model.a:
            return None
        if kind == "_global_forward_pre_hooks":
            (h,) = args[0]  # type: ignore[misc]
            return (h * h.shape[0],)
        return args[1] * args[1].shape[0]  # type: ignore[operator]

    sample(model, x, 8, seed=0)
    sample(model, x, 8, seed=0)  # (the check compiled)
    hooks = torch.nn.modules.module
    noted = getattr(hooks, kind)
    setattr(hooks, kind, OrderedDict([(-1, batch_sized)]))
    try:
        made = plan(model, x)
        assert not made.prefix  # so the plan kept from before, which shares it, would be wrong
        assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))
    finally:
        setattr(hooks, kind, noted)


def test_a_hook_swapped_in_place_makes_a_new_plan() -> None:
    """A hook replaced under its handle's key (the keys as planned, not the hooks)."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)
    handle = model.a.register_forward_hook(lambda module, args, out: None)
    sample(model, x, 8, seed=0)
    model.a._forward_hooks[handle.id] = lambda module, args, out: out * out.shape[0]
    made = plan(model, x)
    assert not made.prefix  # so the plan kept with the first hook would share it
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


class Nested(nn.Module):
    """Containers in a container, counting its runs: ``(N, 4) -> (N, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Linear(4, 16), nn.ReLU()), nn.Sequential(nn.Dropout(0.3))
        )
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
        self.runs: list[None] = []

    def forward(self, x: Tensor) -> Tensor:
        self.runs.append(None)
        return self.head(self.body(x))


def _reorder(m: Nested) -> None:
    children = m.head._modules  # the same keys and modules in another order: tanh last
    children["1"] = children.pop("1")


def _move(m: Nested) -> None:
    m.body[1].append(m.head[0])  # (the same layers in the same order, in other containers)
    del m.head[0]


@pytest.mark.parametrize("change", [_reorder, _move])
def test_children_reordered_or_moved_make_a_new_plan(change: Callable[[Nested], None]) -> None:
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    change(model)
    before = len(model.runs)
    got = sample(model, x, 8, seed=2)
    assert len(model.runs) > before + 1  # the probe's passes, then the call's
    assert torch.equal(got, sample(model, x, 8, seed=2, plan=plan(model, x)))


def _children_dict_replaced(m: Nested) -> None:
    # a container's dict of children set anew (as ModuleList.__delitem__ does): a layer the
    # prefix cannot share put before the dropout, in a dict the check did not note
    m.body[1]._modules = OrderedDict([("0", BatchSized()), ("1", m.body[1][0])])


def _hooks_dict_replaced(m: Nested) -> None:
    # hooks set as a dict anew (``module._forward_hooks = OrderedDict()`` clears them)
    batch_sized = OrderedDict([(0, lambda module, args, out: out * out.shape[0])])
    m.body[0][1]._forward_hooks = batch_sized


def _pre_hooks_dict_replaced(m: Nested) -> None:
    batch_sized = OrderedDict([(0, lambda module, args: (args[0] * args[0].shape[0],))])
    m.body[1][0]._forward_pre_hooks = batch_sized


@pytest.mark.parametrize(
    "change", [_children_dict_replaced, _hooks_dict_replaced, _pre_hooks_dict_replaced]
)
def test_a_torch_modules_dicts_set_anew_make_a_new_plan(change: Callable[[Nested], None]) -> None:
    """A torch module's ``_modules`` or hook dicts replaced by a dict of their own, not changed
    in place: the kept plan shared a prefix the model's layers no longer allow."""
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    sample(model, x, 8, seed=0)  # (the check compiled)
    change(model)
    made = plan(model, x)
    assert not made.prefix  # so the plan kept from before, which shares it, would be wrong
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


class Named(nn.Module):
    """Children read by name, two of them before the dropout: ``(N, 4) -> (N, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.spare, self.act = BatchSized(), nn.ReLU()
        self.drop, self.b = nn.Dropout(0.3), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.drop(self.act(self.a(x))))


def test_children_renamed_in_their_order_make_a_new_plan() -> None:
    """The same children in the same order under other names: ``act`` is now the layer the
    prefix cannot share."""
    torch.manual_seed(0)
    model = Named().eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    sample(model, x, 8, seed=0)  # (the check compiled)
    children = model._modules
    renamed = [({"spare": "act", "act": "spare"}.get(k, k), v) for k, v in children.items()]
    children.clear()
    children.update(renamed)
    made = plan(model, x)
    assert not made.prefix  # so the plan kept from before, which shares it, would be wrong
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


def test_a_model_on_another_device_finds_no_plan_kept() -> None:
    """The device is the first parameter's, as model_device finds it: a model moved, a
    parameter put before it, or a first parameter unset leave the one found on another device
    (``meta``: no values, so the checks are those of the kept plan, not a sampling call)."""
    x = torch.randn(3, 4)

    def planned() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Identity(), *_chain()).eval()
        sample(model, x, 4, seed=0)
        assert plan_cache.kept(model, x) is not None
        return model

    model = planned()
    model.to("meta")
    assert plan_cache.kept(model, x) is None
    model = planned()
    model[0].register_parameter("w", nn.Parameter(torch.zeros(1, device="meta")))
    assert plan_cache.kept(model, x) is None
    model = planned()
    model[1].bias = nn.Parameter(model[1].bias.to("meta"))
    assert plan_cache.kept(model, x) is not None  # the weight comes first
    model[1].weight = None
    assert plan_cache.kept(model, x) is None


def test_models_of_one_layout_keep_plans_of_their_own() -> None:
    """Models alike share the code of their check (compiled once for the layout), each
    comparing its own modules."""
    torch.manual_seed(0)
    a, b = Counting().eval(), Counting().eval()
    x = torch.randn(3, 4)
    for model in (a, b):
        sample(model, x, 4, seed=0)
        before = model.forwards
        sample(model, x, 4, seed=0)
        assert model.forwards == before + 1  # kept: the check compiled (b's: a's code)
    b.drop.p = 0.5
    before_a, before_b = a.forwards, b.forwards
    got_a, got_b = sample(a, x, 4, seed=1), sample(b, x, 4, seed=1)
    assert a.forwards == before_a + 1  # its plan kept
    assert b.forwards > before_b + 1  # planned again
    assert torch.equal(got_a, sample(a, x, 4, seed=1, plan=plan(a, x)))
    assert torch.equal(got_b, sample(b, x, 4, seed=1, plan=plan(b, x)))


class Key(str):
    """An attribute name of a class of str's own, whose repr is no literal."""

    def __repr__(self) -> str:
        return "a key"


@pytest.mark.parametrize("key", ["", "it's\n", Key("scale")], ids=repr)
def test_attributes_of_any_name_are_noted(key: object) -> None:
    """Names set through ``vars()`` that no attribute syntax gives (a str of a class of its own:
    named in the check, not a literal), on a module of the user's
    class and on torch's: the check's source names them as they are."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)
    vars(model)[key] = 1.5
    vars(model.drop)[key] = 2.5
    sample(model, x, 4, seed=0)
    before = model.forwards
    sample(model, x, 4, seed=0)
    assert model.forwards == before + 1  # kept
    for owner in (model, model.drop):
        vars(owner)[key] = 3.5  # set anew
        before = model.forwards
        sample(model, x, 4, seed=0)
        assert model.forwards > before + 1  # planned again


class Unhashable(str):
    """An attribute name whose hash fails once ``broken`` is set."""

    broken = False

    def __hash__(self) -> int:
        if Unhashable.broken:
            raise TypeError("no hash")
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def test_a_check_that_cannot_read_a_name_finds_no_plan_kept() -> None:
    """The check says no, never raises, for a model whatever its state: a name it cannot look
    up (a fresh plan, which does not, samples)."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)
    vars(model)[Unhashable("scale")] = 1.5
    sample(model, x, 4, seed=0)
    sample(model, x, 4, seed=0)  # (the check compiled)
    Unhashable.broken = True
    try:
        fresh = sample(model, x, 4, seed=1, plan=plan(model, x))
        assert plan_cache.kept(model, x) is None
    finally:
        Unhashable.broken = False
    assert torch.equal(sample(model, x, 4, seed=1), fresh)


class Loose(type):
    """A metaclass whose classes are all equal (``==``), never the same (``is``)."""

    def __eq__(cls, other: object) -> bool:
        return isinstance(other, Loose)

    __hash__ = type.__hash__


class LooseReLU(nn.Module, metaclass=Loose):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class LooseBatchSized(nn.Module, metaclass=Loose):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * x.shape[0]


@pytest.mark.parametrize("depth", [0, 16])  # (with many modules, compared in one loop)
def test_a_module_given_an_equal_class_makes_a_new_plan(depth: int) -> None:
    """Classes compared by identity: another one equal by its metaclass's ``==`` is a change."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), LooseReLU(), *(nn.Identity() for _ in range(depth)), nn.Dropout(0.3)
    ).eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    sample(model, x, 8, seed=0)  # (the check compiled)
    model[1].__class__ = LooseBatchSized
    made = plan(model, x)
    assert not made.prefix  # so the plan kept from before, which shares it, would be wrong
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


@pytest.mark.parametrize("depth", [0, 16])  # (with many modules, compared in one loop)
def test_a_module_given_another_class_makes_a_new_plan(depth: int) -> None:
    class Doubled(nn.Dropout):
        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x, self.p, self.training) * 2

    torch.manual_seed(0)
    inner = Counting()
    model = nn.Sequential(*(nn.Identity() for _ in range(depth)), inner) if depth else inner
    model.eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    inner.drop.__class__ = Doubled  # a routed plan would call F.dropout in its place
    fresh = sample(model, x, 8, seed=2, plan=plan(model, x))
    assert torch.equal(sample(model, x, 8, seed=2), fresh)


def _softmax_over_the_batch() -> tuple[nn.Module, Tensor, Callable[[nn.Module], None]]:
    model = nn.Sequential(nn.Linear(4, 16), nn.Softmax(dim=1), nn.Dropout(0.3), nn.Linear(16, 2))

    def change(m: nn.Module) -> None:
        m[1].dim = 0  # the layers before the first dropout now mix the batch

    return model, torch.randn(3, 4), change


def _activation_that_drops() -> tuple[nn.Module, Tensor, Callable[[nn.Module], None]]:
    model = EncoderClassifier()

    def change(m: nn.Module) -> None:
        for layer in m.encoder.layers:  # a dropout call the direct run would not see
            layer.activation = lambda h: F.dropout(F.relu(h), 0.5, True)

    return model, torch.randn(3, 5, 8), change


def _batch_statistics() -> tuple[nn.Module, Tensor, Callable[[nn.Module], None]]:
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 2))

    def change(m: nn.Module) -> None:
        m[1].track_running_stats = False  # with no statistics, BatchNorm uses the batch's
        m[1].running_mean = m[1].running_var = None

    return model, torch.randn(3, 4), change


@pytest.mark.parametrize(
    "make", [_softmax_over_the_batch, _activation_that_drops, _batch_statistics]
)
def test_a_torch_module_set_anew_makes_a_new_plan(
    make: Callable[[], tuple[nn.Module, Tensor, Callable[[nn.Module], None]]],
) -> None:
    torch.manual_seed(0)
    model, x, change = make()
    model.eval()
    sample(model, x, 8, seed=0)
    change(model)
    try:
        fresh: Tensor | Exception = sample(model, x, 8, seed=2, plan=plan(model, x))
    except ValueError as exc:  # BatchNorm refuses the probe's one-row batches
        fresh = exc
    if isinstance(fresh, Exception):
        with pytest.raises(type(fresh), match=re.escape(str(fresh))):
            sample(model, x, 8, seed=2)
    else:
        assert torch.equal(sample(model, x, 8, seed=2), fresh)


def test_a_forward_set_on_the_class_makes_a_new_plan() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.drop(torch.relu(self.a(x))))

    def batch_sized(self: Model, x: Tensor) -> Tensor:  # as a notebook cell might redefine it
        return self.b(self.drop(torch.relu(self.a(x)) * x.shape[0]))

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    Model.forward = batch_sized  # type: ignore[method-assign,assignment]
    made = plan(model, x)
    assert not made.prefix
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


def test_a_graph_module_recompiled_makes_a_new_plan() -> None:
    """torch.fx.GraphModule.recompile sets a new forward on the module's own class."""
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(_chain().eval())
    x = torch.randn(3, 4)
    sample(model, x, 8, seed=0)
    relu = next(n for n in model.graph.nodes if n.op == "call_module" and n.target == "1")
    with model.graph.inserting_after(relu):
        size = model.graph.call_method("size", (relu, 0))
    with model.graph.inserting_after(size):
        scaled = model.graph.call_function(torch.mul, (relu, size))
    relu.replace_all_uses_with(scaled, delete_user_cb=lambda user: user not in (size, scaled))
    model.recompile()  # the ReLU's output times the batch size: no prefix to share
    made = plan(model, x)
    assert not made.prefix
    assert torch.equal(sample(model, x, 8, seed=2), sample(model, x, 8, seed=2, plan=made))


def test_a_call_the_kept_plan_lacks_runs_with_a_fresh_plan() -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(4, 4)
    sample(model, x, 8, seed=0)
    model.extra = True  # one dropout call more, which the module tree does not show
    fresh = sample(model, x, 8, seed=5, plan=plan(model, x))
    assert torch.equal(sample(model, x, 8, seed=5), fresh)
    assert torch.equal(next(iter(sample_chunks(model, x, 8, seed=5))).values, fresh)
    model.extra = False  # and one fewer
    fresh = sample(model, x, 8, seed=5, plan=plan(model, x))
    assert torch.equal(sample(model, x, 8, seed=5), fresh)


_GLOBAL = {"extra": False}


class GlobalFlag(Recurrent):
    """A forward under the torch-function mode (an LSTM's dropout) with one more dropout call
    where a global says so: nothing in the model shows it."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.rnn(x)[0][:, -1]
        if _GLOBAL["extra"]:
            h = F.dropout(h, 0.4, self.training)
        return self.head(h)


@pytest.mark.parametrize("extra", [True, False])
def test_a_call_that_shows_only_in_the_pass_runs_again_with_a_fresh_plan(extra: bool) -> None:
    torch.manual_seed(0)
    model = GlobalFlag().eval()
    x = torch.randn(3, 6, 4)
    _GLOBAL["extra"] = not extra
    try:
        sample(model, x, 8, seed=0)
        _GLOBAL["extra"] = extra
        fresh = sample(model, x, 8, seed=5, plan=plan(model, x))
        assert torch.equal(sample(model, x, 8, seed=5), fresh)
        _GLOBAL["extra"] = not extra
        fresh = sample(model, x, 8, seed=5, plan=plan(model, x))
        assert torch.equal(next(iter(sample_chunks(model, x, 8, seed=5))).values, fresh)
        # a plan the caller keeps is the caller's: it says what is wrong
        kept = plan(model, x)
        _GLOBAL["extra"] = extra
        with pytest.raises(UnsupportedModelError, match="sampling plan"):
            sample(model, x, 8, seed=5, plan=kept)
    finally:
        _GLOBAL["extra"] = False


def test_bad_arguments_are_refused_before_any_probe() -> None:
    model = Counting().eval()
    with pytest.raises(InvalidArgumentError, match="n_samples"):
        sample(model, torch.randn(2, 4), 0)
    with pytest.raises(InvalidArgumentError, match="first_sample"):
        list(sample_chunks(model, torch.randn(2, 4), 3, first_sample=-1))
    assert model.forwards == 0


@pytest.mark.parametrize("first", [False, True])
def test_plans_are_kept_per_autocast(first: bool) -> None:
    """Under autocast a dropout sees bfloat16 activations, half the bytes: a pass may hold
    twice the rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1 << 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(1 << 16, 2))
    model.eval()
    x = torch.randn(1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=first):
        sample(model, x, 2, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not first):
        made = plan(model, x)
        fresh = [(c.samples, c.values) for c in sample_chunks(model, x, 100, seed=1, plan=made)]
        kept = [(c.samples, c.values) for c in sample_chunks(model, x, 100, seed=1)]
        assert [s for s, _ in kept] == [s for s, _ in fresh]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(kept, fresh, strict=True))
        assert torch.equal(sample(model, x, 100, seed=1), sample(model, x, 100, seed=1, plan=made))


def test_plans_are_kept_for_the_latest_shapes_only() -> None:
    model = Counting().eval()
    widths = range(4, 4 + MAX_PLANS + 1)
    for width in widths:
        sample(model, torch.randn(2, width), 2, seed=0)
    before = model.forwards
    sample(model, torch.randn(2, widths[-1]), 2, seed=0)
    assert model.forwards == before + 1  # the latest: kept
    sample(model, torch.randn(2, widths[0]), 2, seed=0)
    assert model.forwards > before + 2  # the oldest: made again


def test_what_predict_found_is_kept_for_the_latest_input_keys_only() -> None:
    """A server sees many batch sizes: what a prediction found is kept for the latest
    MAX_EVAL_KEYS input keys, and a key evicted is found again (one pass, watched)."""
    model = Watched().eval()
    sizes = range(1, MAX_EVAL_KEYS + 2)
    for n in sizes:
        predict(model, torch.zeros(n, 3))
    assert model.watched == [True] * len(sizes)
    model.watched.clear()
    for n in (sizes[-1], sizes[1], 1, 1):  # the latest, the oldest still kept, the one evicted
        predict(model, torch.zeros(n, 3))
    assert model.watched == [False, False, True, False]
    found = vars(model)["_mcdrop_plans"].eval_drops
    assert len(found) == MAX_EVAL_KEYS


def test_a_model_that_changes_on_every_call_keeps_the_plain_pass_of_each_input_key() -> None:
    """A forward that keeps its last output changes the model on every call, as far as kept
    plans can tell: a prediction of a key not seen finds it changed, and keeps what was found
    for the other keys to drop nothing (no prediction checks that against the model)."""
    model = Watched(keeps_last=True).eval()
    for n in (1, 2, 1, 2, 3, 1, 2, 3):
        predict(model, torch.zeros(n, 3))
    assert model.watched == [True, True, False, False, True, False, False, False]


def test_threads_finding_many_input_keys_at_once_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # A forward that drops in eval mode for even batch sizes only, predicted on four threads at
    # once for more batch sizes than are kept: findings are made, kept and evicted beside each
    # other, and every prediction is the twin's.
    monkeypatch.setattr(plan_cache, "MAX_EVAL_KEYS", 4)
    torch.manual_seed(0)
    model = DropsFor(lambda x: x.shape[0] % 2 == 0).eval()
    torch.manual_seed(0)
    twin = DropsFor(never).eval()
    rows = {n: torch.randn(n, 2, 3) for n in range(1, 11)}
    want = {n: twin(x) for n, x in rows.items()}
    failures: list[BaseException] = []

    def run(offset: int) -> None:
        try:
            for i in range(5 * len(rows)):
                n = 1 + (i * 3 + offset) % len(rows)
                if not torch.equal(predict(model, rows[n]), want[n]):
                    raise AssertionError(f"{n} rows")
        except BaseException as exc:  # reported below
            failures.append(exc)

    _on_threads(*(partial(run, k) for k in range(4)))
    assert failures == []
    assert len(vars(model)["_mcdrop_plans"].eval_drops) <= 4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_sampled_without_a_plan_is_freed(name: str) -> None:
    make, shape = MODELS[name]
    model = make().eval()
    for n, n_samples in ((1, 1), (2, 8)):
        sample(model, torch.randn(n, *shape), n_samples, seed=0)
    gone = weakref.ref(model)
    del model
    gc.collect()  # the model and its kept plans are a cycle: the collector frees them
    assert gone() is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_kept_plans_do_not_travel_with_the_model() -> None:
    torch.manual_seed(0)
    model = _chain().eval()
    x = torch.randn(3, 4)
    want = sample(model, x, 8, seed=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copies = [loaded, copy.deepcopy(model), copy.copy(model)]
    for other in copies:
        assert torch.equal(sample(other, x, 8, seed=1), want)
        assert torch.equal(sample(other, x, 8, seed=1, plan=plan(other, x)), want)
    # a shallow copy shares the original's __dict__ entries, but never its plans
    assert vars(copies[2])["_mcdrop_plans"] is not vars(model)["_mcdrop_plans"]
    assert torch.equal(sample(model, x, 8, seed=1), want)
    torch.jit.script(model)  # the entry is no attribute a scripted forward would need


def _on_threads(*targets: Callable[[], object]) -> None:
    """Each target on a thread of its own, all started, then all joined."""
    threads = [threading.Thread(target=target) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _sampled_on_threads(
    model: nn.Module, x: Tensor, n_samples: int, want: Tensor, calls: int, threads: int
) -> list[bool]:
    """Whether each of ``calls`` calls given no plan on each of ``threads`` threads at once
    sampled ``want``."""
    got: list[bool] = []

    def run() -> None:
        for _ in range(calls):
            got.append(torch.equal(sample(model, x, n_samples, seed=3), want))

    _on_threads(*[run] * threads)
    return got


def test_threads_sampling_one_model_without_a_plan_agree() -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)
    want = sample(model, x, 16, seed=3, plan=plan(model, x))
    assert _sampled_on_threads(model, x, 16, want, calls=20, threads=4) == [True] * 80


class CountingAttention(Counting):
    """Counting, with an nn.MultiheadAttention (routed: mcdrop.routing) after its dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, dropout=0.2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = super().forward(x).repeat(1, 2).view(x.shape[0], 1, 4)
        return self.attention(h, h, h, need_weights=False)[0][:, 0]


class HeldCounting(Counting):
    """Counting, whose forward waits, while its dropout module is routed, until let go."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = threading.Event(), threading.Event()
        self.holds = False

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.holds and "forward" in vars(self.drop):
            self.entered.set()
            self.go.wait(60)
        return y


class Meddler:
    """A setting whose class check runs code, that sets an attribute on its module there: what
    another thread's routed pass does (a route set on the module) while a plan is kept."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # (read by isinstance)
        vars(self.module)[f"set{len(vars(self.module))}"] = None
        return Meddler


def test_a_module_changed_while_its_plan_is_kept_samples() -> None:
    """Keeping a plan reads each module's attributes from a copy made at once: a module given
    one meanwhile (by another thread's pass: a route) is no error out of the sampling call."""
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(3, 4)
    vars(model.drop)["meddler"] = Meddler(model.drop)
    got = sample(model, x, 8, seed=2)
    assert torch.equal(got, sample(model, x, 8, seed=2, plan=plan(model, x)))


def test_a_plan_kept_during_another_threads_routed_pass_serves_after_it() -> None:
    """A call given no plan plans and keeps one while another thread's pass has put its route on
    the model's dropout module: the route is no setting of the module's, and the call after the
    pass ends finds the plan kept."""
    torch.manual_seed(0)
    model = HeldCounting().eval()
    x = torch.randn(3, 4)
    given = plan(model, x)
    assert given.routes is not None
    model.holds = True
    thread = threading.Thread(target=lambda: sample(model, x, 4, seed=3, plan=given))
    thread.start()
    try:
        assert model.entered.wait(60)
        model.holds = False
        first = sample(model, x, 4, seed=3)  # plans, and keeps the plan
    finally:
        model.go.set()
        thread.join(timeout=120)
    assert "forward" not in vars(model.drop)
    before = model.forwards
    assert torch.equal(sample(model, x, 4, seed=3), first)
    assert model.forwards == before + 1  # one pass: no plan made again


@pytest.mark.parametrize("model_class", [Counting, CountingAttention])
def test_threads_sampling_one_routed_model_without_a_plan_keep_its_plan(
    model_class: type[Counting],
) -> None:
    """A routed pass puts a route on the model's dropout modules (and attention) for its length
    (as their ``forward``): a call beside it on another thread still finds the kept plan."""
    torch.manual_seed(0)
    model = model_class().eval()
    x = torch.randn(3, 4)
    assert plan(model, x).routes is not None
    want = sample(model, x, 4, seed=3)
    before = model.forwards
    assert _sampled_on_threads(model, x, 4, want, calls=100, threads=4) == [True] * 400
    assert model.forwards == before + 400  # one pass a call: none planned again


def test_a_model_in_training_mode_keeps_its_plan() -> None:
    """A plan is made in eval mode whatever the model's flags: toggling them makes none, nor
    does a call beside another thread's, which holds a training model's flags switched."""
    torch.manual_seed(0)
    model = Counting().train()
    x = torch.randn(3, 4)
    want = sample(model, x, 4, seed=3)
    before = model.forwards
    model.eval()
    assert torch.equal(sample(model, x, 4, seed=3), want)
    model.train()
    assert torch.equal(sample(model, x, 4, seed=3), want)
    assert model.forwards == before + 2
    assert _sampled_on_threads(model, x, 4, want, calls=100, threads=3) == [True] * 300
    assert model.forwards == before + 302
    assert model.training


def test_threads_keeping_plans_for_many_shapes_at_once_agree() -> None:
    # More shapes than a model keeps, on four threads: plans are made, kept and evicted beside
    # each other, and every call still gives a fresh plan's samples.
    torch.manual_seed(0)
    model = Counting().eval()
    rows = {w: torch.randn(2, w) for w in range(4, 4 + MAX_PLANS + 4)}
    want = {w: sample(model, x, 4, seed=1, plan=plan(model, x)) for w, x in rows.items()}
    failures: list[BaseException] = []

    def run(offset: int) -> None:
        try:
            for i in range(3 * len(rows)):
                w = 4 + (i + offset) % len(rows)
                if not torch.equal(sample(model, rows[w], 4, seed=1), want[w]):
                    raise AssertionError(f"width {w}")
        except BaseException as exc:  # reported below
            failures.append(exc)

    _on_threads(*(partial(run, k) for k in range(4)))
    assert failures == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("scripted", ["first layer", "last layer"])
def test_a_model_with_a_scripted_submodule_samples_and_predicts_without_a_kept_plan(
    scripted: str,
) -> None:
    """A submodule compiled by torch.jit.script has wrappers for dicts and no forward its class
    gives: the model's state cannot be noted, so no plan is kept for it (each call plans
    afresh), and its calls sample and predict as with a plan of their own. (They raised an
    AttributeError or a KeyError.)"""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3)]
    at = 0 if scripted == "first layer" else -1
    layers[at] = torch.jit.script(layers[at])
    model = nn.Sequential(*layers).eval()
    x = torch.randn(2, 4)
    for _ in range(2):
        got = sample(model, x, 3, seed=1)
        assert torch.equal(got, sample(model, x, 3, seed=1, plan=plan(model, x)))
        assert predict(model, x).shape == (2, 3)
    assert plan_cache.kept(model, x) is None
    assert not torch.equal(got[0], got[1])  # (it samples)

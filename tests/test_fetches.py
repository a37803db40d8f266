"""The fetch and feed rules of DESIGN.md ("Fetches", "Feeds"), tested on ``fetches.py``."""

from __future__ import annotations

import collections
from typing import NamedTuple

import pytest
import torch
from conftest import requires_cuda
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.aggregation import SumMetric

from lightning_finalops import to_host
from lightning_finalops.fetches import (
    TensorFeeds,
    accepted_keywords,
    check_fetches,
    evaluate,
    split_feeds,
)


class Pair(NamedTuple):
    first: object
    second: object


# -- structure -----------------------------------------------------------------------------------


def test_evaluate_keeps_nested_list_tuple_and_dict():
    t = torch.tensor(1.0)
    result = evaluate({"a": [t, (t, None)], "b": {"c": t}})
    assert isinstance(result, dict)
    assert isinstance(result["a"], list)
    assert isinstance(result["a"][1], tuple)
    assert result["a"][1][1] is None
    assert isinstance(result["b"], dict)
    assert result["b"]["c"].item() == 1.0


def test_evaluate_keeps_namedtuples():
    result = evaluate(Pair(torch.tensor(1.0), lambda: 2))
    assert type(result) is Pair
    assert result.first.item() == 1.0
    assert result.second == 2


def test_evaluate_keeps_ordered_dict_type_and_order():
    fetches = collections.OrderedDict([("z", lambda: 1), ("a", lambda: 2)])
    result = evaluate(fetches)
    assert type(result) is collections.OrderedDict
    assert list(result.items()) == [("z", 1), ("a", 2)]


def test_evaluate_of_none_is_none():
    assert evaluate(None) is None
    assert evaluate([None, {"x": None}]) == [None, {"x": None}]


def test_evaluate_does_not_return_the_fetched_containers():
    fetches = {"a": [torch.tensor(1.0)]}
    result = evaluate(fetches)
    assert result is not fetches
    assert result["a"] is not fetches["a"]


# -- tensors -------------------------------------------------------------------------------------


def test_evaluate_tensor_is_detached():
    w = torch.ones(2, requires_grad=True)
    result = evaluate(w * 3)
    assert not result.requires_grad
    assert result.grad_fn is None
    assert torch.equal(result, torch.full((2,), 3.0))


def test_evaluate_tensor_is_a_snapshot_unchanged_by_a_later_in_place_update():
    t = torch.zeros(3)
    result = evaluate(t)
    t.add_(5)
    assert torch.equal(result, torch.zeros(3))


def test_evaluate_parameter_is_a_snapshot_unchanged_by_optimizer_step():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.weight.detach().clone()
    fetched = evaluate({"w": model.weight, "w_fn": lambda: model.weight})
    model(torch.ones(4, 2)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model.weight.detach(), before)  # the step really moved the weight
    assert torch.equal(fetched["w"], before)
    assert torch.equal(fetched["w_fn"], before)


def test_evaluate_tensor_stays_on_its_device_and_dtype():
    t = torch.arange(4, dtype=torch.int16)
    result = evaluate(t)
    assert result.device == t.device
    assert result.dtype == torch.int16


# -- metrics -------------------------------------------------------------------------------------


def test_evaluate_metric_calls_compute():
    metric = MeanMetric()
    for value in (1.0, 2.0, 3.0, 6.0):
        metric.update(torch.tensor(value))
    result = evaluate({"mean": metric})
    assert isinstance(result["mean"], torch.Tensor)
    assert result["mean"].item() == pytest.approx(3.0)


def test_evaluate_metric_value_is_a_snapshot():
    metric = SumMetric()
    metric.update(torch.tensor(2.0))
    result = evaluate(metric)
    metric.update(torch.tensor(5.0))
    assert result.item() == pytest.approx(2.0)
    assert metric.compute().item() == pytest.approx(7.0)


def test_evaluate_metric_collection_gives_its_dict():
    collection = MetricCollection({"mean": MeanMetric(), "sum": SumMetric()})
    collection.update(torch.tensor([1.0, 3.0]))
    result = evaluate(collection)
    assert set(result) == {"mean", "sum"}
    assert result["mean"].item() == pytest.approx(2.0)
    assert result["sum"].item() == pytest.approx(4.0)


# -- callables -----------------------------------------------------------------------------------


def test_evaluate_calls_a_callable_once_and_normalises_its_result():
    calls = []
    w = torch.ones(2, requires_grad=True)

    def step():
        calls.append(1)
        return {"loss": (w * 2).sum(), "n": 3}

    result = evaluate(step)
    assert calls == [1]
    assert result["n"] == 3
    assert result["loss"].item() == 4.0
    assert not result["loss"].requires_grad


def test_evaluate_callable_result_is_a_snapshot():
    t = torch.zeros(2)
    result = evaluate(lambda: t)
    t.fill_(7)
    assert torch.equal(result, torch.zeros(2))


def test_evaluate_passes_str_feeds_only_to_callables_that_accept_them():
    seen = {}

    def takes_scale(scale):
        seen["scale"] = scale
        return scale * 2

    def takes_nothing():
        return "ok"

    def takes_kwargs(**kwargs):
        seen["kwargs"] = kwargs
        return len(kwargs)

    def takes_other(offset=0):
        seen["offset"] = offset
        return offset

    result = evaluate(
        [takes_scale, takes_nothing, takes_kwargs, takes_other],
        str_feeds={"scale": 3, "mode": "eval"},
    )
    assert result == [6, "ok", 2, 0]
    assert seen == {"scale": 3, "kwargs": {"scale": 3, "mode": "eval"}, "offset": 0}


def test_evaluate_passes_str_feeds_to_keyword_only_parameters():
    def fn(*, scale):
        return scale + 1

    assert evaluate(fn, str_feeds={"scale": 1}) == 2


@pytest.mark.parametrize(
    "wrap", [lambda f: [f], lambda f: (f,), lambda f: Pair(None, f), lambda f: {"k": [f]}],
    ids=["list", "tuple", "namedtuple", "dict-of-list"],
)
def test_evaluate_lets_stop_iteration_from_a_callable_escape_unchanged(wrap):
    # "StopIteration from next() ends the session cleanly" needs the exact type to get out,
    # whatever container the step sits in (not PEP 479's RuntimeError).
    exhausted = iter(())
    with pytest.raises(StopIteration):
        evaluate(wrap(lambda: next(exhausted)))


def test_accepted_keywords_skips_positional_only_and_var_positional():
    def fn(a, /, *args, b, c=1):
        return a

    assert accepted_keywords(fn, ["a", "args", "b", "c", "d"]) == ["b", "c"]


def test_accepted_keywords_of_var_keyword_accepts_every_name():
    assert accepted_keywords(lambda **kw: kw, ["x", "y"]) == ["x", "y"]


# -- names ---------------------------------------------------------------------------------------


def test_evaluate_str_is_looked_up_in_the_first_namespace_that_has_it():
    step_values = {"loss": torch.tensor(1.0)}
    session_values = {"loss": torch.tensor(9.0), "acc": torch.tensor(0.5)}
    result = evaluate(["loss", "acc"], namespaces=(step_values, session_values))
    assert result[0].item() == 1.0
    assert result[1].item() == 0.5


def test_evaluate_str_name_value_is_a_snapshot():
    values = {"buf": torch.zeros(2)}
    result = evaluate("buf", namespaces=(values,))
    values["buf"].add_(1)
    assert torch.equal(result, torch.zeros(2))


def test_evaluate_str_name_of_a_metric_is_computed():
    metric = MeanMetric()
    metric.update(torch.tensor([2.0, 4.0]))
    result = evaluate("m", namespaces=({"m": metric},))
    assert result.item() == pytest.approx(3.0)


def test_evaluate_unknown_name_raises_key_error_listing_known_names():
    with pytest.raises(KeyError) as info:
        evaluate({"x": "los"}, namespaces=({"loss": 1}, {"acc": 2}), root="final_ops")
    message = str(info.value)
    assert "'los'" in message
    assert "['acc', 'loss']" in message
    assert "final_ops['x']" in message


# -- bad leaves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 2.5, object(), b"bytes", {1, 2}])
def test_check_fetches_rejects_a_bad_leaf_naming_its_position(bad):
    with pytest.raises(TypeError) as info:
        check_fetches({"acc": [torch.tensor(1.0), bad]}, "final_ops")
    assert "final_ops['acc'][1]" in str(info.value)


def test_check_fetches_names_the_root_for_a_bad_top_level_fetch():
    with pytest.raises(TypeError, match=r"^fetches must be"):
        check_fetches(3, "fetches")


def test_check_fetches_accepts_every_valid_leaf():
    check_fetches(
        {"t": torch.ones(1), "m": MeanMetric(), "f": len, "s": "loss", "n": None,
         "nested": [(torch.ones(1),), Pair("a", None)]},
        "fetches",
    )


def test_evaluate_rejects_a_bad_leaf_naming_its_position():
    with pytest.raises(TypeError) as info:
        evaluate({"acc": (lambda: 1, 3)}, root="final_ops")
    assert "final_ops['acc'][1]" in str(info.value)
    assert "int" in str(info.value)


# -- feeds ---------------------------------------------------------------------------------------


def test_tensor_feeds_apply_overwrites_in_place_and_restore_puts_back():
    t = torch.tensor([1.0, 2.0])
    storage = t.data_ptr()
    feeds = TensorFeeds({t: [5.0, 6.0]})
    feeds.apply()
    assert torch.equal(t, torch.tensor([5.0, 6.0]))
    assert t.data_ptr() == storage  # in place: every holder of the tensor sees the feed
    feeds.restore()
    assert torch.equal(t, torch.tensor([1.0, 2.0]))


def test_tensor_feeds_restore_in_reverse_order_of_application():
    w = torch.zeros(3)
    # overlapping feeds (a session rejects them; TensorFeeds alone does not): only a
    # restore in reverse order gives w back
    feeds = TensorFeeds({w: [1.0, 1.0, 1.0], w[:2]: [2.0, 2.0]})
    feeds.apply()
    assert w.tolist() == [2.0, 2.0, 1.0]
    feeds.restore()
    assert w.tolist() == [0.0, 0.0, 0.0]


def test_tensor_feeds_restore_is_safe_twice():
    t = torch.tensor(1.0)
    feeds = TensorFeeds({t: 2.0})
    feeds.apply()
    t.fill_(9.0)  # whatever happened during the run
    feeds.restore()
    feeds.restore()
    assert t.item() == 1.0


def test_tensor_feeds_convert_to_the_tensor_dtype():
    t = torch.zeros(2, dtype=torch.int64)
    feeds = TensorFeeds({t: [1.7, 2.2]})
    feeds.apply()
    assert t.dtype == torch.int64
    assert t.tolist() == [1, 2]
    feeds.restore()


def test_tensor_feeds_work_on_a_parameter_that_requires_grad():
    p = torch.nn.Parameter(torch.zeros(2))
    feeds = TensorFeeds({p: [1.0, 1.0]})
    feeds.apply()
    assert p.tolist() == [1.0, 1.0]
    feeds.restore()
    assert p.tolist() == [0.0, 0.0]


def test_tensor_feeds_shape_mismatch_raises_value_error():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*shape \(3,\)"):
        TensorFeeds({t: torch.zeros(2, 2)})
    assert torch.equal(t, torch.zeros(3))


def test_tensor_feeds_bool_is_whether_anything_is_fed():
    assert not TensorFeeds({})
    assert TensorFeeds({torch.zeros(()): 1.0})


def test_split_feeds_splits_tensor_and_str_keys():
    t = torch.zeros(1)
    tensors, names = split_feeds({t: 1.0, "scale": 2}, "feed_dict")
    assert list(tensors) == [t] and tensors[t] == 1.0
    assert names == {"scale": 2}


@pytest.mark.parametrize("empty", [None, {}])
def test_split_feeds_of_nothing_is_empty(empty):
    assert split_feeds(empty, "feed_dict") == ({}, {})


def test_split_feeds_rejects_a_bad_key():
    with pytest.raises(TypeError, match=r"final_ops_feed_dict keys .* got key int"):
        split_feeds({3: 1.0}, "final_ops_feed_dict")


def test_split_feeds_rejects_a_non_mapping():
    with pytest.raises(TypeError, match="feed_dict must be a mapping"):
        split_feeds([("a", 1)], "feed_dict")


# -- to_host -------------------------------------------------------------------------------------


def test_to_host_keeps_structure_and_values_on_cpu():
    values = {"a": [torch.tensor(1.0), (torch.arange(3), None)], "n": 4, "s": "x"}
    result = to_host(values)
    assert result["a"][0].device.type == "cpu"
    assert torch.equal(result["a"][1][0], torch.arange(3))
    assert result["a"][1][1] is None
    assert result["n"] == 4 and result["s"] == "x"


def test_to_host_of_no_tensors_returns_the_values():
    assert to_host({"n": 1, "l": [None]}) == {"n": 1, "l": [None]}
    assert to_host(None) is None


@requires_cuda
def test_to_host_brings_cuda_tensors_of_several_dtypes_back_in_their_structure():
    device = torch.device("cuda")
    Point = collections.namedtuple("Point", "x y")
    values = {
        "f32": torch.tensor([1.5, 2.5], device=device),
        "i64": torch.arange(6, device=device).reshape(2, 3),
        "bf16": torch.tensor(3.0, dtype=torch.bfloat16, device=device),
        "nested": [Point(torch.tensor([True, False], device=device), 7), None],
        "cpu": torch.tensor(9.0),
    }
    result = to_host(values)
    assert result["f32"].device.type == "cpu" and result["f32"].tolist() == [1.5, 2.5]
    assert result["i64"].shape == (2, 3) and result["i64"].dtype == torch.int64
    assert result["i64"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert result["bf16"].dtype == torch.bfloat16 and result["bf16"].item() == 3.0
    assert type(result["nested"][0]) is Point
    assert result["nested"][0].x.tolist() == [True, False]
    assert result["nested"][0].y == 7 and result["nested"][1] is None
    assert result["cpu"].item() == 9.0
    # the source tensors are untouched and still on the GPU
    assert values["f32"].device.type == "cuda"


@requires_cuda
def test_evaluate_on_cuda_does_not_synchronise_and_keeps_values_on_cuda():
    device = torch.device("cuda")
    w = torch.randn(4, 4, device=device, requires_grad=True)
    metric = MeanMetric(nan_strategy="disable").to(device)
    metric.update(torch.tensor([1.0, 3.0], device=device))
    buffers = {"loss": (w @ w).sum()}
    fetches = {
        "w": w, "norm": lambda: w.norm(), "m": metric, "loss": "loss",
        "int": torch.arange(3, device=device),
    }
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = evaluate(fetches, namespaces=(buffers,))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for key in ("w", "norm", "m", "loss", "int"):
        assert result[key].device.type == "cuda", key
    host = to_host(result)
    assert host["m"].item() == pytest.approx(2.0)
    assert torch.allclose(host["norm"], w.detach().norm().cpu())

"""Tests for the JSON files of TopKPlan and SensitivityProfile."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from lexi_pl.plan import TopKPlan
from lexi_pl.profile_table import SensitivityProfile


def make_plan(**overrides):
    fields = {
        "top_k": {"model.layers.0.mlp": 1, "model.layers.1.mlp": 2, "model.layers.2.mlp": 2},
        "native_top_k": {"model.layers.0.mlp": 2, "model.layers.1.mlp": 2, "model.layers.2.mlp": 4},
        "budget": 5,
        "method": "dp",
        "objective": 1.25,
        "profile_settings": {"batch": 4, "seq": 128, "seed": 0},
        "fingerprint": "abc123",
        "extra": {"note": "test"},
    }
    fields.update(overrides)
    return TopKPlan(**fields)


def make_profile(**overrides):
    fields = {
        "layer_names": ["model.layers.0.mlp", "model.layers.1.mlp"],
        "native_top_k": [2, 3],
        "max_top_k": [4, 4],
        "num_experts": [8, 16],
        "deltas": [[0.7, 0.0], [2.5, 1.0, 0.0]],
        "base_norms": [10.0, 20.0],
        "fingerprint": "abc123",
        "settings": {"batch": 2, "seq": 64, "iterations": 3, "seed": 0, "dtype": "float32", "device": "cpu"},
        "timing": {"seconds_per_layer": [0.1, 0.2]},
    }
    fields.update(overrides)
    return SensitivityProfile(**fields)


def write_plan_dict(path, **changes):
    data = make_plan().to_dict()
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_plan_properties():
    plan = make_plan()

    assert plan.total == 5
    assert plan.native_total == 8
    assert plan.fraction == pytest.approx(0.625)
    assert plan.routing_weights == "native"
    assert plan.normalize == "none"
    assert plan.format_version == 1
    assert plan.package_version


def test_plan_round_trip(tmp_path):
    plan = make_plan()
    path = tmp_path / "nested" / "dir" / "plan.json"

    plan.save(path)
    loaded = TopKPlan.load(path)

    assert loaded == plan
    assert list(loaded.top_k) == list(plan.top_k)
    assert json.loads(path.read_text())["top_k"] == plan.top_k


def test_plan_save_leaves_no_temporary_file(tmp_path):
    make_plan().save(tmp_path / "plan.json")

    assert os.listdir(tmp_path) == ["plan.json"]


def test_plan_failed_save_keeps_old_file(tmp_path):
    path = tmp_path / "plan.json"
    make_plan().save(path)
    before = path.read_text()

    with pytest.raises(ValueError, match="not JSON-serialisable"):
        make_plan(extra={"bad": object()}).save(path)

    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["plan.json"]


def test_plan_load_corrupt_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"top_k": {"a": 1')

    with pytest.raises(ValueError, match=f"invalid top-k plan file {re.escape(str(path))}: not valid JSON"):
        TopKPlan.load(path)


def test_plan_load_not_an_object(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[1, 2]")

    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: expected a JSON object, found list"):
        TopKPlan.load(path)


def test_plan_load_unknown_format_version(tmp_path):
    path = write_plan_dict(tmp_path / "plan.json", format_version=2)

    message = f"{re.escape(str(path))}: unsupported top-k plan format_version 2.*reads format_version 1"
    with pytest.raises(ValueError, match=message):
        TopKPlan.load(path)


def test_plan_load_missing_field(tmp_path):
    path = tmp_path / "plan.json"
    data = make_plan().to_dict()
    del data["budget"]
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: top-k plan is missing the fields \['budget'\]"):
        TopKPlan.load(path)


@pytest.mark.parametrize("bad_k", [0, -1, 2.5, "2", True, None])
def test_plan_load_bad_k(tmp_path, bad_k):
    top_k = {"model.layers.0.mlp": 1, "model.layers.1.mlp": bad_k, "model.layers.2.mlp": 2}
    path = write_plan_dict(tmp_path / "plan.json", top_k=top_k)

    message = rf"{re.escape(str(path))}: top_k\['model.layers.1.mlp'\] must be a positive integer"
    with pytest.raises(ValueError, match=message):
        TopKPlan.load(path)


def test_plan_load_budget_mismatch(tmp_path):
    path = write_plan_dict(tmp_path / "plan.json", budget=6)

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: budget must equal the sum of top_k \(5\), found 6"):
        TopKPlan.load(path)


def test_plan_layer_mismatch():
    with pytest.raises(ValueError, match="same layers in the same order"):
        make_plan(native_top_k={"model.layers.0.mlp": 2, "model.layers.2.mlp": 4, "model.layers.1.mlp": 2})


def test_plan_table():
    table = make_plan().table()
    lines = table.splitlines()

    assert lines[0].split() == ["layer", "native", "k", "plan", "k"]
    assert lines[2].split() == ["model.layers.0.mlp", "2", "1"]
    assert lines[4].split() == ["model.layers.2.mlp", "4", "2"]
    assert lines[-1] == "total active experts: 5 of 8 (62.5 %)"


def test_profile_round_trip(tmp_path):
    profile = make_profile()
    path = tmp_path / "profiles" / "profile.json"

    profile.save(path)
    loaded = SensitivityProfile.load(path)

    assert loaded == profile
    assert loaded.num_layers == 2
    assert loaded.native_total == 5


def test_profile_deltas_shape_error():
    with pytest.raises(ValueError, match=r"deltas of layer 'model.layers.1.mlp' must list one value per k = 1..3"):
        make_profile(deltas=[[0.7, 0.0], [1.0, 0.0]])


def test_profile_list_length_error():
    with pytest.raises(ValueError, match=r"base_norms must be a list with one entry per MoE layer \(2\), found 1"):
        make_profile(base_norms=[1.0])


def test_profile_native_delta_must_be_zero():
    with pytest.raises(ValueError, match="at its native k=2 must be 0"):
        make_profile(deltas=[[0.7, 0.1], [2.5, 1.0, 0.0]])


def test_profile_load_shape_error_names_file(tmp_path):
    path = tmp_path / "profile.json"
    data = make_profile().to_dict()
    data["deltas"][0] = [0.7]
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match=f"invalid sensitivity profile file {re.escape(str(path))}: deltas of layer"):
        SensitivityProfile.load(path)


def test_profile_load_unknown_format_version(tmp_path):
    path = tmp_path / "profile.json"
    data = make_profile().to_dict()
    data["format_version"] = 7
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: unsupported sensitivity profile format_version 7"):
        SensitivityProfile.load(path)


def test_profile_load_corrupt_json(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("not json")

    with pytest.raises(ValueError, match=f"invalid sensitivity profile file {re.escape(str(path))}: not valid JSON"):
        SensitivityProfile.load(path)


def test_profile_accepts_tuples_and_numpy_scalars(tmp_path):
    profile = make_profile(
        native_top_k=(2, 3),
        deltas=[(np.float32(0.5), 0.0), [np.float64(2.5), np.float32(1.0), 0]],
        base_norms=[np.float32(10.0), 20],
    )
    path = profile.save(tmp_path / "profile.json")

    assert profile.native_top_k == [2, 3]
    assert profile.deltas == [[0.5, 0.0], [2.5, 1.0, 0.0]]
    assert all(type(delta) is float for row in profile.deltas for delta in row)
    assert SensitivityProfile.load(path) == profile


def test_plan_stores_numpy_scalars_as_python(tmp_path):
    plan = make_plan(
        top_k={"model.layers.0.mlp": np.int64(1), "model.layers.1.mlp": 2, "model.layers.2.mlp": np.int32(2)},
        budget=np.int64(5),
        objective=np.float32(1.25),
    )
    path = plan.save(tmp_path / "plan.json")

    assert type(plan.top_k["model.layers.0.mlp"]) is int
    assert type(plan.budget) is int
    assert type(plan.objective) is float
    assert TopKPlan.load(path) == plan

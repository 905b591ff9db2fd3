"""Feature config: the shipped configs load, and every mistake is named where it was made."""
from __future__ import annotations

import copy

import pytest
import yaml

from schemas.feature_config import (CONFIG_DIR, DenseSpec, FeatureConfig, FeatureConfigError,
                                    SlotSpec, load_feature_config)

BASE = {
    "version": 1,
    "defaults": {"dim": 8, "occurrence_threshold": 1, "expiry_seconds": 3600},
    "slots": [
        {"name": "user", "slot": 1, "source": "user_id"},
        {"name": "age", "slot": 2, "source": "age", "dim": 4,
         "bucketize": {"boundaries": [18, 25, 35]}},
        {"name": "user_x_genre", "slot": 3, "source": ["user_id", "genres"],
         "occurrence_threshold": 5, "expiry_seconds": None},
    ],
    "dense": [{"name": "age_dense", "source": "age", "default": 30, "transform": "log1p"}],
}


def with_change(path, value, base=BASE):
    """A copy of base with the entry at path (keys / indices) set to value (or removed)."""
    raw = copy.deepcopy(base)
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is REMOVE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


REMOVE = object()


def test_valid_config_and_defaults():
    config = FeatureConfig.from_dict(BASE)
    assert [s.slot for s in config.slots] == [1, 2, 3]
    assert config.slot_by_id[1] == SlotSpec(name="user", slot=1, fields=("user_id",), dim=8,
                                            occurrence_threshold=1, expiry_seconds=3600)
    age = config.slot_by_name["age"]
    assert (age.dim, age.boundaries, age.is_cross) == (4, (18, 25, 35), False)
    cross = config.slot_by_id[3]
    assert cross.is_cross and cross.fields == ("user_id", "genres")
    assert (cross.occurrence_threshold, cross.expiry_seconds) == (5, None)
    assert config.dense == (DenseSpec("age_dense", "age", 30.0, "log1p"),)
    assert config.fields == {"user_id", "age", "genres"}
    assert config.max_list_length == 32
    assert FeatureConfig.from_dict(config.to_dict()) == config


def test_a_cross_buckets_the_fields_it_names():
    raw = with_change(("slots", 2), {"name": "age_x_genre", "slot": 3, "source": ["age", "genres"],
                                     "bucketize": {"age": {"boundaries": [18, 25]}}})
    config = FeatureConfig.from_dict(raw)
    cross = config.slot_by_name["age_x_genre"]
    assert cross.cross_boundaries == (("age", (18, 25)),) and cross.boundaries is None
    assert config.to_dict()["slots"][2]["bucketize"] == {"age": {"boundaries": [18, 25]}}
    assert FeatureConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["movielens", "synthetic"])
def test_shipped_configs_load(name):
    config = load_feature_config(name)
    assert config == FeatureConfig.load(CONFIG_DIR / f"{name}.yaml")
    assert {"user_id", "item_id"} <= config.fields
    assert all(s.dim > 0 for s in config.slots)


@pytest.mark.parametrize("path,value,where,problem", [
    (("slots", 0, "dimm"), 8, "slots[0] (user)", "unknown key 'dimm' (did you mean 'dim'?)"),
    (("slots", 1, "slot"), 1, "slots[1] (age)", "duplicate slot id 1 (also slots[0])"),
    (("slots", 1, "name"), "user", "slots[1] (user)", "duplicate name 'user'"),
    (("slots", 0, "slot"), 32768, "slots[0] (user).slot", "32768 is out of range 0..32767"),
    (("slots", 0, "slot"), -1, "slots[0] (user).slot", "-1 is out of range 0..32767"),
    (("slots", 0, "slot"), "1", "slots[0] (user).slot", "expected an integer, got '1'"),
    (("slots", 0, "slot"), True, "slots[0] (user).slot", "expected an integer, got True"),
    (("slots", 0, "dim"), 0, "slots[0] (user).dim", "0 is out of range >= 1"),
    (("defaults", "dim"), -3, "defaults.dim", "-3 is out of range >= 1"),
    (("defaults", "bogus"), 1, "defaults", "unknown key 'bogus'"),
    (("slots", 1, "bucketize", "boundaries"), [18, 35, 25], "slots[1] (age).bucketize.boundaries",
     "not sorted strictly increasing: 35 then 25"),
    (("slots", 1, "bucketize", "boundaries"), [18, 18], "slots[1] (age).bucketize.boundaries",
     "not sorted strictly increasing"),
    (("slots", 1, "bucketize", "boundaries"), [], "slots[1] (age).bucketize.boundaries",
     "expected a non-empty list"),
    (("slots", 1, "bucketize", "boundaries"), [1, float("nan")],
     "slots[1] (age).bucketize.boundaries[1]", "expected a finite number"),
    (("slots", 1, "bucketize"), {"bounds": [1]}, "slots[1] (age).bucketize",
     "unknown key 'bounds'"),
    (("slots", 2, "bucketize"), {"boundaries": [1]}, "slots[2] (user_x_genre).bucketize",
     "in a cross, map a field of its source to its boundaries"),
    (("slots", 2, "bucketize"), {"age": {"boundaries": [1]}}, "slots[2] (user_x_genre).bucketize",
     "'age' is not a field of the cross"),
    (("slots", 2, "bucketize"), {"genres": {"quantiles": 4}},
     "slots[2] (user_x_genre).bucketize.genres", "fixed 'boundaries' only"),
    (("slots", 2, "bucketize"), {"genres": {"boundaries": [2, 1]}},
     "slots[2] (user_x_genre).bucketize.genres.boundaries", "not sorted strictly increasing"),
    (("slots", 2, "bucketize"), {}, "slots[2] (user_x_genre).bucketize",
     "map a field of its source to its boundaries"),
    (("slots", 0, "source"), [], "slots[0] (user).source", "an empty list names no field"),
    (("slots", 0, "source"), ["a", "a"], "slots[0] (user).source", "a field repeats"),
    (("slots", 0, "source"), 3, "slots[0] (user).source", "expected a field name, got 3"),
    (("slots", 0, "source"), REMOVE, "slots[0] (user)", "missing required key 'source'"),
    (("slots", 0, "occurrence_threshold"), 70000, "slots[0] (user).occurrence_threshold",
     "out of range 0..65535"),
    (("slots", 0, "expiry_seconds"), 0, "slots[0] (user).expiry_seconds", "must be positive"),
    (("slots", 0, "optional"), "yes", "slots[0] (user).optional", "expected true or false"),
    (("slots",), [], "slots", "expected a non-empty list"),
    (("slots", 0), "user_id", "slots[0]", "expected a mapping, got str"),
    (("dense", 0, "transform"), "log", "dense[0] (age_dense).transform", "'log' is not one of"),
    (("dense", 0, "default"), "x", "dense[0] (age_dense).default", "expected a finite number"),
    (("dense", 0, "src"), "x", "dense[0] (age_dense)", "unknown key 'src'"),
    (("version",), 2, "version", "unsupported version 2"),
    (("extra",), 1, "", "unknown key 'extra'"),
    (("max_list_length",), 0, "max_list_length", "0 is out of range >= 1"),
])
def test_invalid_configs_name_the_field_and_the_problem(path, value, where, problem):
    with pytest.raises(FeatureConfigError) as info:
        FeatureConfig.from_dict(with_change(path, value))
    assert info.value.where == where
    assert problem in info.value.problem
    assert str(info.value).startswith(where)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change(("slots", 0, "slot"), 99999)))
    with pytest.raises(FeatureConfigError, match=r"bad\.yaml: slots\[0\] \(user\)\.slot: 99999"):
        FeatureConfig.load(bad)
    bad.write_text("slots: [unclosed")
    with pytest.raises(FeatureConfigError, match="not valid YAML"):
        FeatureConfig.load(bad)
    with pytest.raises(FeatureConfigError, match="no such file, nor a config name"):
        FeatureConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(FeatureConfigError, match="expected a mapping"):
        FeatureConfig.from_yaml("- just a list")

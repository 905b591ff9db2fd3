"""Feature config: one declarative YAML file says which fields make which slots.

Feature extraction (``transforms/features.py``), training and the parameter server all read
the same file, so a slot's id, embedding dim, occurrence threshold and expiry live in one
place. Example (``schemas/configs/movielens.yaml`` is a complete one)::

    version: 1
    max_list_length: 32          # a list-valued field longer than this is dead-lettered
    defaults:                    # every slot's value unless the slot says otherwise
      dim: 8
      occurrence_threshold: 0    # sightings before the PS gives a fid a row (0 or 1: at once)
      expiry_seconds: null       # event-time seconds a row may stay unseen (null: never)
      optional: false            # true: a missing field gives no fid instead of a dead letter
    slots:
      - {name: user, slot: 1, source: user_id, expiry_seconds: 2592000}
      - {name: age, slot: 3, source: age, bucketize: {boundaries: [18, 25, 35, 50]}}
      - {name: gender_x_genre, slot: 20, source: [gender, genres]}    # a cross
    dense:
      - {name: item_age, source: item_age_years, default: 0, transform: log1p}

A ``source`` names a field of the FeatureLog's ``features`` map, or its top-level
``user_id`` / ``item_id``. A list of fields is a *cross*: one fid per combination of their
values. ``bucketize`` turns a number into the index of its bucket (``x < b[0]`` is 0,
``b[i-1] <= x < b[i]`` is i), which is then the value hashed.

>>> config = FeatureConfig.from_dict({"slots": [
...     {"name": "user", "slot": 1, "source": "user_id"},
...     {"name": "age", "slot": 2, "source": "age", "dim": 4,
...      "bucketize": {"boundaries": [18, 30]}}]})
>>> config.slot_by_id[2].dim, config.slot_by_name["user"].fields
(4, ('user_id',))
>>> FeatureConfig.from_dict({"slots": [{"name": "u", "slot": 40000, "source": "user_id"}]})
Traceback (most recent call last):
...
schemas.feature_config.FeatureConfigError: slots[0] (u).slot: 40000 is out of range 0..32767
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from schemas.fid import MAX_SLOT

__all__ = ["FeatureConfig", "SlotSpec", "DenseSpec", "FeatureConfigError", "CONFIG_DIR",
           "load_feature_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MAX_THRESHOLD = 65535  # the PS filter's widest counter
DENSE_TRANSFORMS = ("identity", "log1p")


class FeatureConfigError(ValueError):
    """An invalid feature config. ``where`` names the offending entry, ``problem`` says why."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One sparse slot: what it hashes and how the PS keeps its embeddings."""
    name: str
    slot: int                               # 0..32767, the fid's top 15 bits
    fields: tuple[str, ...]                 # one field, or several for a cross
    dim: int                                # embedding width
    occurrence_threshold: int = 0           # sightings before a fid gets a PS row
    expiry_seconds: float | None = None     # evict a row unseen this long (event time)
    boundaries: tuple[float, ...] | None = None  # bucketize a number by these
    optional: bool = False                  # missing field: no fid (else: dead letter)

    @property
    def is_cross(self) -> bool:
        return len(self.fields) > 1


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """One dense input: a number read from a field, in the config's order."""
    name: str
    source: str
    default: float | None = None            # used when the field is missing; None: required
    transform: str = "identity"             # or log1p: sign(x) * log(1 + |x|)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    slots: tuple[SlotSpec, ...]
    dense: tuple[DenseSpec, ...] = ()
    max_list_length: int = 32
    slot_by_id: dict = dataclasses.field(init=False, repr=False, compare=False)
    slot_by_name: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "slot_by_id", {s.slot: s for s in self.slots})
        object.__setattr__(self, "slot_by_name", {s.name: s for s in self.slots})

    @property
    def fields(self) -> frozenset:
        """Every field some slot or dense input reads."""
        return frozenset(f for s in self.slots for f in s.fields) | \
            frozenset(d.source for d in self.dense)

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.dense]

    @classmethod
    def from_dict(cls, raw: Any) -> "FeatureConfig":
        """Validate a parsed config; raises :class:`FeatureConfigError` naming the entry."""
        return _parse(raw)

    @classmethod
    def from_yaml(cls, text: str) -> "FeatureConfig":
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FeatureConfigError("", f"not valid YAML: {e}") from None
        return _parse(raw)

    @classmethod
    def load(cls, path_or_name: str | Path) -> "FeatureConfig":
        """From a YAML (or JSON) file, or by name from ``schemas/configs/`` ("movielens")."""
        path = Path(path_or_name)
        if not path.is_file() and (CONFIG_DIR / f"{path_or_name}.yaml").is_file():
            path = CONFIG_DIR / f"{path_or_name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise FeatureConfigError(str(path_or_name),
                                     f"no such file, nor a config name in {known}")
        try:
            return cls.from_yaml(path.read_text(encoding="utf-8"))
        except FeatureConfigError as e:
            raise FeatureConfigError(f"{path}: {e.where}" if e.where else str(path),
                                     e.problem) from None

    def to_dict(self) -> dict:
        """The config as plain data; ``from_dict(to_dict())`` gives an equal config."""
        slots = []
        for s in self.slots:
            d = {"name": s.name, "slot": s.slot,
                 "source": s.fields[0] if len(s.fields) == 1 else list(s.fields),
                 "dim": s.dim, "occurrence_threshold": s.occurrence_threshold,
                 "expiry_seconds": s.expiry_seconds, "optional": s.optional}
            if s.boundaries is not None:
                d["bucketize"] = {"boundaries": list(s.boundaries)}
            slots.append(d)
        dense = [dataclasses.asdict(d) for d in self.dense]
        return {"version": 1, "max_list_length": self.max_list_length, "slots": slots,
                "dense": dense}


def load_feature_config(path_or_name: str | Path) -> FeatureConfig:
    """Shorthand for :meth:`FeatureConfig.load`."""
    return FeatureConfig.load(path_or_name)


# ---------------------------------------------------------------------------------------
# Validation. Each check names where it looked, so the message points at the line to fix.

TOP_KEYS = ("version", "description", "max_list_length", "defaults", "slots", "dense")
DEFAULT_KEYS = ("dim", "occurrence_threshold", "expiry_seconds", "optional")
SLOT_KEYS = ("name", "slot", "source", "bucketize") + DEFAULT_KEYS
DENSE_KEYS = ("name", "source", "default", "transform")
BUILTIN_DEFAULTS = {"dim": 8, "occurrence_threshold": 0, "expiry_seconds": None,
                    "optional": False}


def _check_keys(where: str, raw: Any, allowed: tuple, required: tuple = ()) -> None:
    if not isinstance(raw, Mapping):
        raise FeatureConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FeatureConfigError(where, f"unknown key {key!r}{hint}; "
                                            f"allowed: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            raise FeatureConfigError(where, f"missing required key {key!r}")


def _int(where: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatureConfigError(where, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise FeatureConfigError(where, f"{value} is out of range {bound}")
    return value


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise FeatureConfigError(where, f"expected a finite number, got {value!r}")
    return value


def _field_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FeatureConfigError(where, f"expected a field name, got {value!r}")
    return value


def _policy(where: str, raw: Mapping, base: dict) -> dict:
    """dim, occurrence_threshold, expiry_seconds, optional: raw's value or base's."""
    out = dict(base)
    if "dim" in raw:
        out["dim"] = _int(f"{where}.dim", raw["dim"], 1)
    if "occurrence_threshold" in raw:
        out["occurrence_threshold"] = _int(f"{where}.occurrence_threshold",
                                           raw["occurrence_threshold"], 0, MAX_THRESHOLD)
    if "expiry_seconds" in raw:
        expiry = raw["expiry_seconds"]
        if expiry is not None and _number(f"{where}.expiry_seconds", expiry) <= 0:
            raise FeatureConfigError(f"{where}.expiry_seconds",
                                     f"must be positive or null (never), got {expiry!r}")
        out["expiry_seconds"] = expiry
    if "optional" in raw:
        if not isinstance(raw["optional"], bool):
            raise FeatureConfigError(f"{where}.optional",
                                     f"expected true or false, got {raw['optional']!r}")
        out["optional"] = raw["optional"]
    return out


def _boundaries(where: str, raw: Any) -> tuple[float, ...]:
    _check_keys(where, raw, ("boundaries",), required=("boundaries",))
    bounds = raw["boundaries"]
    where = f"{where}.boundaries"
    if not isinstance(bounds, list) or not bounds:
        raise FeatureConfigError(where, f"expected a non-empty list of numbers, got {bounds!r}")
    values = tuple(_number(f"{where}[{i}]", b) for i, b in enumerate(bounds))
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise FeatureConfigError(where, f"not sorted strictly increasing: "
                                            f"{values[i - 1]!r} then {values[i]!r}")
    return values


def _slot(i: int, raw: Any, defaults: dict) -> SlotSpec:
    where = f"slots[{i}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        where = f"slots[{i}] ({raw['name']})"
    _check_keys(where, raw, SLOT_KEYS, required=("name", "slot", "source"))
    name = _field_name(f"{where}.name", raw["name"])
    slot = _int(f"{where}.slot", raw["slot"], 0, MAX_SLOT)
    source = raw["source"]
    if isinstance(source, list):
        if not source:
            raise FeatureConfigError(f"{where}.source", "an empty list names no field")
        fields = tuple(_field_name(f"{where}.source[{j}]", f) for j, f in enumerate(source))
        if len(set(fields)) != len(fields):
            raise FeatureConfigError(f"{where}.source", f"a field repeats in {list(fields)}")
    else:
        fields = (_field_name(f"{where}.source", source),)
    boundaries = None
    if raw.get("bucketize") is not None:
        if len(fields) > 1:
            raise FeatureConfigError(f"{where}.bucketize",
                                     "bucketize applies to a single-field slot, not a cross")
        boundaries = _boundaries(f"{where}.bucketize", raw["bucketize"])
    return SlotSpec(name=name, slot=slot, fields=fields, boundaries=boundaries,
                    **_policy(where, raw, defaults))


def _dense(i: int, raw: Any) -> DenseSpec:
    where = f"dense[{i}]"
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        where = f"dense[{i}] ({raw['name']})"
    _check_keys(where, raw, DENSE_KEYS, required=("name", "source"))
    default = raw.get("default")
    if default is not None:
        default = float(_number(f"{where}.default", default))
    transform = raw.get("transform", "identity")
    if transform not in DENSE_TRANSFORMS:
        raise FeatureConfigError(f"{where}.transform",
                                 f"{transform!r} is not one of {list(DENSE_TRANSFORMS)}")
    return DenseSpec(name=_field_name(f"{where}.name", raw["name"]),
                     source=_field_name(f"{where}.source", raw["source"]),
                     default=default, transform=transform)


def _unique(kind: str, items, key, what: str) -> None:
    seen: dict = {}
    for i, item in enumerate(items):
        k = key(item)
        if k in seen:
            raise FeatureConfigError(f"{kind}[{i}] ({item.name})",
                                     f"duplicate {what} {k!r} (also {kind}[{seen[k]}])")
        seen[k] = i


def _parse(raw: Any) -> FeatureConfig:
    _check_keys("", raw, TOP_KEYS, required=("slots",))
    if raw.get("version", 1) != 1:
        raise FeatureConfigError("version", f"unsupported version {raw['version']!r} (known: 1)")
    defaults_raw = raw.get("defaults") or {}
    _check_keys("defaults", defaults_raw, DEFAULT_KEYS)
    defaults = _policy("defaults", defaults_raw, BUILTIN_DEFAULTS)
    max_list = _int("max_list_length", raw.get("max_list_length", 32), 1)
    slots_raw = raw["slots"]
    if not isinstance(slots_raw, list) or not slots_raw:
        raise FeatureConfigError("slots", "expected a non-empty list of slots")
    slots = tuple(_slot(i, s, defaults) for i, s in enumerate(slots_raw))
    _unique("slots", slots, lambda s: s.slot, "slot id")
    _unique("slots", slots, lambda s: s.name, "name")
    dense_raw = raw.get("dense") or []
    if not isinstance(dense_raw, list):
        raise FeatureConfigError("dense", f"expected a list, got {type(dense_raw).__name__}")
    dense = tuple(_dense(i, d) for i, d in enumerate(dense_raw))
    _unique("dense", dense, lambda d: d.name, "name")
    return FeatureConfig(slots=slots, dense=dense, max_list_length=max_list)

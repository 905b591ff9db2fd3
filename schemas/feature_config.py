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
      - {name: age_x_genre, slot: 21, source: [age, genres],          # a bucketized cross
         bucketize: {age: {boundaries: [18, 25, 35, 50]}}}
    dense:
      - {name: item_age, source: item_age_years, default: 0, transform: log1p}

A ``source`` names a field of the FeatureLog's ``features`` map, or its top-level
``user_id`` / ``item_id``. A list of fields is a *cross*: one fid per combination of their
values. ``bucketize`` turns a number into the index of its bucket (``x < b[0]`` is 0,
``b[i-1] <= x < b[i]`` is i), which is then the value hashed. In a cross, ``bucketize`` maps
a field of the cross to its fixed boundaries (``{age: {boundaries: [...]}}``), so a cross can
pair an age *group* with a genre, as TensorFlow's ``crossed_column`` of a
``bucketized_column`` does; fields it does not name enter the cross as they are.

Analysers (tensorflow-transform, computed over a backfill by ``python -m dataflow.analyze``):
``bucketize: {quantiles: 8}`` asks for 8 buckets whose 7 boundaries are the backfill's
quantiles of the field (``epsilon``, optional, is the sketch's error tolerance; TFT's
default ``min(1/quantiles, 0.01)``), and ``normalize: z_score`` on a dense input subtracts
the backfill's mean and divides by its standard deviation (after ``transform``). A config
with analysers is applied with the transform output the analysis wrote
(``transforms.features.Preprocessor``); its names must be letters, digits and ``_``, as they
name tensors of the transform graph::

    slots:
      - {name: age, slot: 3, source: age, bucketize: {quantiles: 8}}
    dense:
      - {name: item_age, source: item_age_years, default: 0, transform: log1p,
         normalize: z_score}

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
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from schemas.fid import MAX_SLOT

__all__ = ["FeatureConfig", "SlotSpec", "DenseSpec", "FeatureConfigError", "CONFIG_DIR",
           "CONFIG_FILE", "load_feature_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The config a transform output directory was analysed with (python -m dataflow.analyze).
CONFIG_FILE = "feature_config.yaml"
MAX_THRESHOLD = 65535  # the PS filter's widest counter
MAX_QUANTILES = 10_000
DENSE_TRANSFORMS = ("identity", "log1p")
DENSE_NORMALIZERS = ("z_score",)
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_]+")


class FeatureConfigError(ValueError):
    """An invalid feature config (example: the module docstring).

    Args:
        where: the offending entry, e.g. ``slots[0] (u).slot``.
        problem: what is wrong with it.
    """

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
    quantiles: int | None = None            # bucketize by the analysis' quantiles (buckets)
    epsilon: float | None = None            # their sketch's error tolerance (None: TFT's)
    # A cross's bucketized fields: ((field, boundaries), ...), in the order of ``fields``.
    cross_boundaries: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def is_cross(self) -> bool:
        return len(self.fields) > 1

    @property
    def analysed(self) -> bool:
        """Its boundaries come from the analysis (the transform output), not the config."""
        return self.quantiles is not None


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """One dense input: a number read from a field, in the config's order."""
    name: str
    source: str
    default: float | None = None            # used when the field is missing; None: required
    transform: str = "identity"             # or log1p: sign(x) * log(1 + |x|)
    normalize: str | None = None            # z_score: by the analysis' mean and variance

    @property
    def analysed(self) -> bool:
        return self.normalize is not None


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """A feature config: which fields make which slots and dense inputs (the module
    docstring). Made by :meth:`from_dict`, :meth:`from_yaml` or :meth:`load`, which check it.

    Args:
        slots: the slots, in config order.
        dense: the dense inputs, in config order.
        max_list_length: the longest list a field may hold (longer: a dead letter).

    Attributes:
        slot_by_id: ``{slot id: SlotSpec}``.
        slot_by_name: ``{name: SlotSpec}``.
    """
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
        """The dense inputs' names, in config order."""
        return [d.name for d in self.dense]

    @property
    def needs_analysis(self) -> bool:
        """True if some slot or dense input needs a transform output (dataflow.analyze)."""
        return any(s.analysed for s in self.slots) or any(d.analysed for d in self.dense)

    @classmethod
    def from_dict(cls, raw: Any) -> "FeatureConfig":
        """A checked config of parsed YAML or JSON.

        Args:
            raw: the parsed config (a dict).

        Returns:
            The :class:`FeatureConfig`.

        Raises:
            FeatureConfigError: an invalid config, naming the entry.
        """
        return _parse(raw)

    @classmethod
    def from_yaml(cls, text: str) -> "FeatureConfig":
        """A checked config of YAML text.

        Args:
            text: the YAML.

        Returns:
            The :class:`FeatureConfig`.

        Raises:
            FeatureConfigError: invalid YAML, or an invalid config.

        >>> FeatureConfig.from_yaml("slots: [{name: user, slot: 1, source: user_id}]").fields
        frozenset({'user_id'})
        """
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FeatureConfigError("", f"not valid YAML: {e}") from None
        return _parse(raw)

    @classmethod
    def load(cls, path_or_name: str | Path) -> "FeatureConfig":
        """A checked config from a file.

        Args:
            path_or_name: a YAML (or JSON) file, a name in ``schemas/configs/``
                (``"movielens"``), or a transform output directory (the config it was
                analysed with).

        Returns:
            The :class:`FeatureConfig`.

        Raises:
            FeatureConfigError: no such file or name, or an invalid config.

        >>> FeatureConfig.load("movielens").slot_by_name["user"].slot
        1
        """
        path = Path(path_or_name)
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            path = path / CONFIG_FILE
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
            elif s.cross_boundaries:
                d["bucketize"] = {f: {"boundaries": list(b)} for f, b in s.cross_boundaries}
            elif s.quantiles is not None:
                d["bucketize"] = {"quantiles": s.quantiles}
                if s.epsilon is not None:
                    d["bucketize"]["epsilon"] = s.epsilon
            slots.append(d)
        dense = [dataclasses.asdict(d) for d in self.dense]
        return {"version": 1, "max_list_length": self.max_list_length, "slots": slots,
                "dense": dense}


def load_feature_config(path_or_name: str | Path) -> FeatureConfig:
    """Shorthand for :meth:`FeatureConfig.load` (the same arguments)."""
    return FeatureConfig.load(path_or_name)


# ---------------------------------------------------------------------------------------
# Validation. Each check names where it looked, so the message points at the line to fix.

TOP_KEYS = ("version", "description", "max_list_length", "defaults", "slots", "dense")
DEFAULT_KEYS = ("dim", "occurrence_threshold", "expiry_seconds", "optional")
SLOT_KEYS = ("name", "slot", "source", "bucketize") + DEFAULT_KEYS
DENSE_KEYS = ("name", "source", "default", "transform", "normalize")
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


def _bucketize(where: str, raw: Any) -> dict:
    """``{"boundaries": (...)}`` or ``{"quantiles": n, "epsilon": e or None}``."""
    _check_keys(where, raw, ("boundaries", "quantiles", "epsilon"))
    if ("boundaries" in raw) == ("quantiles" in raw):
        raise FeatureConfigError(where, "give either 'boundaries' (fixed) or 'quantiles' "
                                        "(a number of buckets from the analysis)")
    if "boundaries" in raw:
        if "epsilon" in raw:
            raise FeatureConfigError(f"{where}.epsilon", "only applies to 'quantiles'")
        return {"boundaries": _boundaries(where, raw)}
    quantiles = _int(f"{where}.quantiles", raw["quantiles"], 2, MAX_QUANTILES)
    epsilon = raw.get("epsilon")
    if epsilon is not None:
        epsilon = _number(f"{where}.epsilon", epsilon)
        if not 0 < epsilon < 1:
            raise FeatureConfigError(f"{where}.epsilon", f"must be in (0, 1), got {epsilon!r}")
        epsilon = float(epsilon)
    return {"quantiles": quantiles, "epsilon": epsilon}


def _cross_bucketize(where: str, raw: Any, fields: tuple[str, ...]) -> tuple:
    """A cross's ``{field: {boundaries: [...]}}`` → ``((field, boundaries), ...)``."""
    if not isinstance(raw, Mapping) or not raw or (
            raw.keys() & {"boundaries", "quantiles", "epsilon"} and not raw.keys() & fields):
        raise FeatureConfigError(where, "in a cross, map a field of its source to its "
                                        f"boundaries, e.g. {{{fields[0]}: {{boundaries: "
                                        f"[...]}}}}; got {raw!r}")
    for field in raw:
        if field not in fields:
            raise FeatureConfigError(where, f"{field!r} is not a field of the cross "
                                            f"{list(fields)}")
    out = []
    for field in fields:
        if field not in raw:
            continue
        spec = raw[field]
        _check_keys(f"{where}.{field}", spec, ("boundaries", "quantiles"))
        if "boundaries" not in spec:
            raise FeatureConfigError(f"{where}.{field}", "a cross buckets a field by fixed "
                                     "'boundaries' only (quantiles need the analysis)")
        out.append((field, _boundaries(f"{where}.{field}", spec)))
    return tuple(out)


def _tensor_name(where: str, name: str) -> None:
    if not _TENSOR_NAME.fullmatch(name):
        raise FeatureConfigError(where, f"{name!r}: an analysed entry's name must be letters, "
                                        "digits and '_' (it names a tensor of the transform)")


def _boundaries(where: str, raw: Any) -> tuple[float, ...]:
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
    bucketize = {}
    if raw.get("bucketize") is not None and len(fields) > 1:
        bucketize = {"cross_boundaries": _cross_bucketize(f"{where}.bucketize",
                                                          raw["bucketize"], fields)}
    elif raw.get("bucketize") is not None:
        bucketize = _bucketize(f"{where}.bucketize", raw["bucketize"])
        if "quantiles" in bucketize:
            _tensor_name(f"{where}.name", name)
    return SlotSpec(name=name, slot=slot, fields=fields, **bucketize,
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
    name = _field_name(f"{where}.name", raw["name"])
    normalize = raw.get("normalize")
    if normalize is not None:
        if normalize not in DENSE_NORMALIZERS:
            raise FeatureConfigError(f"{where}.normalize", f"{normalize!r} is not one of "
                                                           f"{list(DENSE_NORMALIZERS)} or null")
        _tensor_name(f"{where}.name", name)
    return DenseSpec(name=name, source=_field_name(f"{where}.source", raw["source"]),
                     default=default, transform=transform, normalize=normalize)


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

"""The machinery under the typed config tree (config.py holds the tree itself): a field as `setting(default,
doc)`, YAML and dotted-override parsing, type checks against the field types (`Literal[...]` choices included),
range checks from a table, and the markdown reference generated from the fields' docs.

Nothing here knows the config's sections: every function takes the root dataclass (or a section of it), so
config.py's `load_config` / `validate` / `config_reference` are a few lines each. Unknown keys are errors, and
every error names the key (and the file, where there is one).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key at fault."""


def setting(default: Any, doc: str) -> Any:
    """A config field: its default (a list or dict is copied for each instance) and its one-line meaning, which
    `config_reference()` prints (`mathgrpo config reference`, README). A choice among names is typed
    `Literal[...]`: the loader checks it against the type (`coerce`, `check_choices`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _type_name(tp: Any, inner: bool | str = False) -> str:
    """`str`, `int | None`, `list[str] | None`, `list` (a bare list field reads as its origin); a Literal of names
    reads as the type of its values."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp))) if inner == "names" else type(typing.get_args(tp)[0]).__name__
    if origin in (typing.Union, types.UnionType):  # names beside a number type (`int | auto`) are shown as names
        inner = "names" if choices(tp) is None else True
        return " | ".join(_type_name(a, inner=inner) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if inner and not isinstance(tp, type):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def choices(tp: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` field type (None first for an optional one); None for other types."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    literal = [a for a in args if typing.get_origin(a) is Literal]
    if not literal or len(literal) + (type(None) in args) < len(args):  # none, or names beside numbers: coerce's
        return None
    return ((None,) if type(None) in args else ()) + typing.get_args(literal[0])


def _check_choice(value: Any, allowed: tuple, key: str) -> Any:
    if str(value) in ("True", "False") and {"on", "off"} <= set(allowed):  # YAML 1.1 reads a bare on/off as a bool
        value = "on" if str(value) == "True" else "off"
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    allowed = choices(tp)
    if allowed is not None:  # a Literal (or an optional one): null, or one of the names
        if isinstance(value, str) and value.lower() in ("null", "none") and None in allowed:
            return None
        return _check_choice(value, allowed, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {coerce(k, kt, f"{key} (key {k!r})"): coerce(v, vt, f"{key}[{k!r}]") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # allow `a,b,c` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Set `values` (a nested mapping) on the dataclass tree `obj`, each value checked against its field type;
    a key that is no field is an error listing the valid ones."""
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in valid:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{key}'; valid keys in {where}: {', '.join(valid)}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            merge(current, v, f"{key}.")
        else:
            setattr(obj, k, coerce(v, hints[k], key))


def parse_overrides(overrides: list[str]) -> dict:
    """['grpo.beta=0.04', 'trainer.max_steps=80'] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. trainer.max_steps=80)")
        path, raw = item.split("=", 1)
        value = _parse_value(raw)
        node = tree
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def _parse_value(raw: str) -> Any:
    """A YAML scalar, or the raw text when YAML would read a colon inside plain text as a mapping
    (`prompt.instruction=For example: 3 + 4 = 7`) or cannot parse it at all."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def merge_file(obj: Any, path: str | Path) -> None:
    """Merge a YAML file of sections into the tree `obj`; every error names the file."""
    p = Path(path)
    if not p.is_file():
        hint = "" if p.suffix in (".yaml", ".yml", ".json") else \
            " (and not an override either: an override looks like section.key=value)"
        raise ConfigError(f"config file not found: {p}{hint}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:  # an empty file is more likely a mistake than a wish for the 1.5B notebook defaults
        raise ConfigError(f"{p}: the file is empty; put `{{}}` in it to mean the built-in defaults "
                          f"(mathgrpo config reference), or give the settings you want")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    try:
        merge(obj, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _keys(root: Any):
    """(section name, section object, field, its type) for every key of a two-level config tree."""
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            yield sec.name, obj, f, hints[f.name]


def check_choices(root: Any) -> None:
    """Every `Literal[...]` field holds one of its names: again here for a config built or changed in code."""
    for sec, obj, f, tp in _keys(root):
        allowed = choices(tp)
        if allowed is not None:
            setattr(obj, f.name, _check_choice(getattr(obj, f.name), allowed, f"{sec}.{f.name}"))
        elif _mixed(tp):  # e.g. int | Literal["auto"]: a name or a value of the other type
            setattr(obj, f.name, coerce(getattr(obj, f.name), tp, f"{sec}.{f.name}"))


def _mixed(tp: Any) -> bool:
    """A union of a Literal with other types (`int | Literal["auto"]`)."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and \
        any(typing.get_origin(a) is Literal for a in typing.get_args(tp))


def _describe(lo, hi, lo_in: bool, hi_in: bool) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def check_ranges(root: Any, ranges: dict[str, tuple]) -> None:
    """Every float finite and every key of `ranges` ("section.key": (low, high, low included, high included),
    None = unbounded) within its range; the error names the key and the range. A null optional value passes."""
    for sec, obj, f, _ in _keys(root):
        key, v = f"{sec}.{f.name}", getattr(obj, f.name)
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ConfigError(f"{key} must be a finite number, got {v}")
        if key in ranges and v is not None and not isinstance(v, str):  # a name ("auto") has no range
            lo, hi, lo_in, hi_in = ranges[key]
            ok = (v >= lo if lo_in else v > lo) and (hi is None or (v <= hi if hi_in else v < hi))
            if not ok:
                raise ConfigError(f"{key} must be {_describe(lo, hi, lo_in, hi_in)}, got {v}")


def reference(root: Any) -> str:
    """A markdown table of every key of the tree `root`, its type, default and meaning (its `setting`'s doc)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for sec, obj, f, tp in _keys(root):
        default = getattr(obj, f.name)
        lines.append(f"| `{sec}.{f.name}` | {_type_name(tp).replace(' | ', ' or ')} | `{default!r}` | "
                     f"{f.metadata.get('doc', '').replace('|', '/')} |")
    return "\n".join(lines)

"""Settings as frozen dataclasses, loaded from plain mappings (JSON, TOML, command-line values).

Nested dataclass fields are nested mappings (``[train.aggregation]`` in TOML). Unknown keys and values of
the wrong type are a :class:`ConfigError` naming the key (dotted for nested ones). Layers are merged
lowest first, a ``None`` value meaning "not given": defaults < the saved run's config (resume) < a TOML
file < explicit settings (:func:`layered`).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TdrError


def to_dict(cfg) -> dict[str, Any]:
    """Dataclass → JSON-able dict: nested dataclasses become dicts, tuples lists."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls, data: Mapping[str, Any], *, source: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrongly typed values are a ConfigError, and so
    is any value the dataclass itself refuses (its ``ValueError``, prefixed with ``source``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {names}; allowed: {', '.join(sorted(known))}.")
    values = {k: _coerce(prefix + k, v, hints[k], source) for k, v in data.items()}
    try:
        return cls(**values)
    except TdrError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}".rstrip(".") + ".") from None


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` checked against the type ``hint``: ints for ints, floats accept ints, lists become tuples,
    mappings become nested dataclasses."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: '{key}' must not be empty.")
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if value is None:
        raise ConfigError(f"{source}: '{key}' must not be empty.")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a table of settings, got {value!r}.")
        return from_dict(hint, value, source=source, prefix=key + ".")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")
        item = args[0] if args else Any
        return tuple(_coerce(key, v, item, source) for v in value)
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    if hint in checks:
        ok, what = checks[hint]
        if not ok(value):
            raise ConfigError(f"{source}: '{key}' must be {what}, got {value!r}.")
        return float(value) if hint is float else value
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one ConfigError."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None


def section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``[name]`` table of a TOML file if it has one, else the file's top level."""
    if name in data and isinstance(data[name], Mapping):
        rest = [k for k in data if k != name]
        if rest:
            raise ConfigError(f"config file: unknown key(s) {', '.join(sorted(rest))} beside the [{name}] table.")
        return dict(data[name])
    return dict(data)


def merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones, nested mappings key by key; ``None`` values mean "not given"."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge(merged[key], value)
            elif isinstance(value, Mapping):
                merged[key] = merge(value)
            else:
                merged[key] = value
    return merged


def layered(cls, *, saved: Mapping[str, Any] | None = None, file: str | Path | None = None, table: str | None = None,
            given: Mapping[str, Any] | None = None, source: str = "config"):
    """``cls`` from its defaults < ``saved`` (a resumed run's config) < the TOML ``file`` (its ``[table]``, or
    its top level) < ``given`` (explicit settings, ``None`` meaning not given)."""
    from_file = None
    if file is not None:
        data = load_toml(file)
        from_file = section(data, table) if table else data
    return from_dict(cls, merge(saved, from_file, given), source=source)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume(saved, config, free: frozenset[str]) -> None:
    """Refuse to resume a run with settings that change what it computes: every key of ``config`` (dotted
    for nested ones) outside ``free`` must equal the saved run's (``saved``: the same dataclass type)."""
    before, now = _flat(to_dict(saved)), _flat(to_dict(config))
    for key in sorted(now):
        if key not in free and before.get(key) != now[key]:
            raise TdrError(f"resume: '{key}' is {now[key]!r} but the run was started with {before.get(key)!r}; "
                           "resume with the same settings or start a new run folder (out).")

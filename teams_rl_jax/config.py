"""Typed configs: dataclasses loaded from YAML, with ``--set key=value`` overrides, validated.

Every stage owns a frozen dataclass for its settings (``SFTConfig`` in ``sft/config.py``, the policy
stage's in ``rl/config.py`` ...); this module only holds the generic machinery:

* :func:`from_dict` builds a dataclass tree from plain dicts, checking every key and type and naming
  the dotted key path on error (``sft.optim.lr: expected float, got 'fast'``).
* :func:`apply_overrides` applies ``a.b.c=value`` strings (values parsed as YAML scalars).
* :func:`load` = read YAML file + overrides + :func:`from_dict`.
* :func:`to_dict` / :func:`dump` write the resolved config back (secrets redacted).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from teams_rl_jax.errors import ConfigError

T = TypeVar("T")


def _keyed(key: str, msg: str) -> ConfigError:
    """A ConfigError that remembers the dotted key it is about (so ``load`` can name its source)."""
    err = ConfigError(msg)
    err.key = key  # type: ignore[attr-defined]
    return err

# Keys whose values never reach disk or logs.
SECRET_KEYS = ("api_key", "token", "password", "secret")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` against type annotation ``tp``; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise _keyed(path, f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise _keyed(path, f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _keyed(path, f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _keyed(path, f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _keyed(path, f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _keyed(path, f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _keyed(path, f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _keyed(path, f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _keyed(path, f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _keyed(path, f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types.

    Missing keys take the dataclass defaults. ``path`` prefixes key names in error messages. A key in
    the class's ``MOVED_KEYS`` (``{old key: where it is now}``) is an error naming its new place.
    After construction, a ``validate()`` method on the dataclass (if any) is called.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields and key in getattr(cls, "MOVED_KEYS", {}):  # a key that moved elsewhere
            raise _keyed(full, f"'{full}' moved: set {cls.MOVED_KEYS[key]} instead")
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{(path + '.') if path else ''}{close[0]}'? " if close else ""
            choices = ", ".join(sorted(fields))
            raise _keyed(full, f"unknown config key '{full}' ({hint}valid keys here: {choices})")
        kwargs[key] = _convert(value, hints[key], full)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = f"{path}.{missing[0]}" if path else missing[0]
        raise _keyed(full, f"missing required config key '{full}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise _keyed(path, f"{path + ': ' if path else ''}{e}") from None
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value) with the value read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of nested dict ``data`` with each ``a.b=value`` override set."""
    out = _deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def override_source(err: ConfigError, overrides: typing.Sequence[str]) -> str | None:
    """The ``--set`` item that set the key ``err`` is about (the last one wins), or None."""
    key = getattr(err, "key", None)
    if not key:
        return None
    bare = key.split("[")[0]
    for item in reversed(list(overrides)):
        k = item.split("=", 1)[0].strip()
        if bare == k or bare.startswith(k + ".") or k.startswith(bare + "."):
            return item
    return None


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         reshape: typing.Callable[[dict], dict] | None = None) -> T:
    """Load ``cls`` from an optional YAML file (passed through ``reshape`` if given) plus ``key=value`` overrides.

    An error about a key set by an override names the override (``--set a.b=c: ...``), not the file.
    """
    overrides = list(overrides)
    data = read_yaml(path) if path is not None else {}
    data = reshape(data) if reshape is not None else data
    try:
        data = apply_overrides(data, overrides)
        return from_dict(cls, data)
    except ConfigError as e:
        src = override_source(e, overrides)
        if src is not None:
            raise ConfigError(f"--set {src}: {e}") from None
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def is_secret(name: str, value: Any) -> bool:
    """Whether a config field holds a secret: a non-empty string under a name with a secret word
    (``api_key``, ``token``, ``password``, ``secret`` as a whole ``_``-separated word; so
    ``max_new_tokens`` and ``tokenizer`` are not)."""
    low = name.lower()
    words = low.split("_")
    return isinstance(value, str) and bool(value) and any(
        (k in low) if "_" in k else (k in words) for k in SECRET_KEYS)


def to_dict(obj: Any, redact: bool = True) -> Any:
    """Plain-dict view of a config dataclass tree (tuples become lists); secrets redacted."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if redact and is_secret(f.name, v):
                v = "***"
            out[f.name] = to_dict(v, redact)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, redact) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, redact) for k, v in obj.items()}
    return obj


def dump(obj: Any, path: str | Path) -> None:
    """Write the resolved config (secrets redacted) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))

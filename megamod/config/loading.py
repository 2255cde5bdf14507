"""Loading a configuration: a YAML file merged with dotted command-line overrides -> ``Config``.
Unknown sections and flags are errors with a suggestion; values are coerced to each field's type."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Literal

from megamod.config.sections import Config, ConfigError, ModelConfig

def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)  # resolved in the sections module, where the classes live
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(flag: str, tp: Any, value: Any) -> Any:
    """Turn a YAML value or command-line string into the field's type, or say what is wrong."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"--{flag} {value!r} is not allowed; choose one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(flag, item, v) for v in value]
    if isinstance(value, (dict, list, tuple, set)):
        raise ConfigError(f"--{flag} expects a single value, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{flag} expects true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"--{flag} expects a number, got {value!r}")
        try:
            out = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{flag} expects {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"--{flag} expects an integer, got {value!r}")
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"--{flag} expects a finite number, got {value!r}")
        return out
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {flag}")


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """``['--model.n_layers', '4', '--data.paths', '0.7', 'a']`` -> ``{'model': {'n_layers': '4'}, ...}``.

    Values stay strings here; a flag followed by several values keeps them all (list fields).
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key, _, inline = arg[2:].partition("=")
        section, _, name = key.partition(".")
        values: list[str] = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not (argv[i].startswith("--") and not is_number(argv[i])):
            values.append(argv[i])
            i += 1
        if not values:
            raise ConfigError(f"--{key} needs a value")
        out.setdefault(section, {})[name] = values[0] if len(values) == 1 else values
    return out


def is_number(s: str) -> bool:
    """Whether a command-line word is a number (a value such as -1, not a --flag; a blend weight)."""
    try:
        float(s)
        return True
    except ValueError:
        return False


def _merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def build_config(raw: dict[str, Any]) -> Config:
    """Nested dict (YAML + overrides merged) -> validated-type Config. Unknown keys are errors."""
    sections = _sections()
    kwargs: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}{_suggest(section, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of field: value")
        cls = sections[section]
        types_ = _field_types(cls)
        fields: dict[str, Any] = {}
        for name, value in values.items():
            if name not in types_:
                raise ConfigError(f"unknown flag --{section}.{name}{_suggest(name, list(types_))}")
            fields[name] = _coerce(f"{section}.{name}", types_[name], value)
        if cls is ModelConfig:
            kwargs[section] = ModelConfig.from_flavour(fields.pop("flavour", "debug"), **fields)
        else:
            kwargs[section] = cls(**fields)
    return Config(**kwargs)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: top level must be a mapping of sections")
        raw = {k: {} if v is None else v for k, v in raw.items()}  # a section with every field commented out
        bad = [k for k, v in raw.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"--config {path}: section {bad[0]!r} must be a mapping of field: value")
    return build_config(_merge(raw, parse_overrides(overrides or [])))




def help_text() -> str:
    lines = ["Config flags (--section.field value):"]
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{section}.{f.name:<26} {f.metadata.get('help', '')} [{default}]")
    return "\n".join(lines)


"""Dataclass configs -> command line and config files.

One dataclass per stage; every field has a default and a one-line meaning (``param(default, "help")``). A run is configured
in three layers, later ones win: the dataclass defaults, a YAML/TOML file given with ``--config FILE``, then ``--field value``
on the command line. A field that is itself a dataclass is a section: ``optim: {lr: 1e-4}`` in a file, ``--optim.lr 1e-4``
on the command line. A field of a section may also be given by its flat name (``lr: 1e-4``, ``--lr 1e-4``, or
``SFTConfig(lr=1e-4)`` for a config made with ``@flat_kwargs``): the spelling of the configs before they had sections.
Unknown fields, in the file or on the command line, are errors that name the field and where it came from.

    @dataclass
    class SFTConfig:
        lr: float = param(1e-4, "peak learning rate")
    cfg = parse_config(SFTConfig, ["--config", "run.yaml", "--lr", "3e-4"])
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A bad config value or field; the message names the field and the file or argument it came from."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          default_factory: Any = dataclasses.MISSING, flat: str | None = None) -> Any:
    """A dataclass field with its meaning (shown by ``--help``), optional allowed ``choices`` and an optional range
    (``ge``/``gt`` lower, ``le``/``lt`` upper bound; for a list, of each element), checked whenever a config is read
    (``parse_config``, ``from_dict``) and by ``check_ranges``.

    flat: inside a section, the field's name at the top level of the config (default: its own name), e.g. the field
    ``rank`` of the section ``lora`` is also ``lora_rank``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if flat is not None:
        meta["flat"] = flat
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str = "", **defaults: Any) -> Any:
    """A nested dataclass field (a section of the config): ``cls(**defaults)`` unless configured."""
    return dataclasses.field(default_factory=functools.partial(cls, **defaults), metadata={"help": help})


def flat_aliases(cls: type) -> dict[str, tuple[str, str]]:
    """{flat name: (section, field)} for the fields of ``cls``'s sections (one level), e.g. {"lr": ("optim", "lr")}.
    A flat name that is also a top-level field, or that two sections share, is not an alias."""
    hints = _hints(cls)
    top = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(hints[f.name]):
            continue
        for g in dataclasses.fields(hints[f.name]):
            name = g.metadata.get("flat", g.name)
            seen[name] = seen.get(name, 0) + 1
            out[name] = (f.name, g.name)
    return {k: v for k, v in out.items() if k not in top and seen[k] == 1}


def flat_kwargs(cls: type) -> type:
    """Let a sectioned config dataclass also take the flat names of its section fields as keyword arguments:
    ``PPOConfig(lr=1e-5)`` sets ``cfg.optim.lr``. Apply after ``@dataclass``."""
    init = cls.__init__
    aliases = flat_aliases(cls)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        routed: dict[str, dict] = {}
        for name in [k for k in kwargs if k in aliases]:
            sec, field = aliases[name]
            routed.setdefault(sec, {})[field] = kwargs.pop(name)
        init(self, *args, **kwargs)
        for sec, upd in routed.items():
            setattr(self, sec, dataclasses.replace(getattr(self, sec), **upd))

    cls.__init__ = __init__
    return cls


# ---------------------------------------------------------------------------------------------------------------- types

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    opt, inner = _is_optional(tp)
    if opt:
        return f"{_type_name(inner)} | None"
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"{origin.__name__}[{_type_name(args[0]) if args else 'str'}]"
    if origin is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check / convert ``value`` (from a file: any YAML/TOML scalar or list; from the CLI: a string) to type ``tp``.

    ``where`` names the field and its source for the error message, e.g. ``"run.yaml: field 'lr'"``.
    """
    opt, inner = _is_optional(tp)
    if opt:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return convert(value, inner, where)
    if value is None:
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        elem = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(elem)}, got {value!r}")
        items = [convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _check_choices(f: dataclasses.Field, value: Any, where: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    _check_range(f, value, where)


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b),
        "lt": ("<", lambda v, b: v < b)}


def range_rule(f: dataclasses.Field) -> str:
    """The allowed range of a field as text, e.g. ">= 0 and < 1" ('' when the field has none)."""
    bounds = f.metadata.get("range") or {}
    return " and ".join(f"{_OPS[k][0]} {int(b) if float(b).is_integer() else b}" for k, b in bounds.items())


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    bounds = f.metadata.get("range")
    if not bounds or value is None:
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not all(
                _OPS[k][1](v, b) for k, b in bounds.items()):
            raise ConfigError(f"{where}: {v!r} is out of range; must be {range_rule(f)}")


def check_ranges(cfg: Any, source: str = "") -> None:
    """Check every field of ``cfg`` (nested sections included) against its declared range and choices; raises
    ConfigError naming the field. For configs built in code (``SFTConfig(lr=-1)``); ``parse_config`` checks as it
    reads."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            check_ranges(value, f"{source}{f.name}.")
        else:
            _check_choices(f, value, f"{type(cfg).__name__}: field '{source}{f.name}'")


# ------------------------------------------------------------------------------------------------------ dict <-> config

def from_dict(cls: type, data: dict, source: str = "<dict>", _prefix: str = "", base: Any = None,
              _labels: dict | None = None) -> Any:
    """Build ``cls`` from a (nested) mapping; ``base`` (an instance) supplies the values not given.

    At the top level, the flat name of a section field (``lr`` for ``optim.lr``) is accepted; a nested value given
    both ways takes the flat one. Unknown keys raise ConfigError naming the key and ``source``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{_prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    updates = {}
    aliases = flat_aliases(cls) if not _prefix else {}
    flat: dict[str, dict] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields and name in aliases:
            sec, field = aliases[name]
            flat.setdefault(sec, {})[field] = (value, name)
            continue
        if name not in fields:
            raise ConfigError(f"{source}: unknown field '{_prefix}{key}' for {cls.__name__} "  # noqa: E501
                              f"(known: {', '.join(sorted(fields))})")
        f, tp = fields[name], hints[name]
        label = (_labels or {}).get(name, f"{_prefix}{name}")
        where = f"{source}: --{label}" if source == "command line" else f"{source}: field '{label}'"
        if dataclasses.is_dataclass(tp):
            updates[name] = from_dict(tp, value, source, f"{_prefix}{name}.", getattr(obj, name))
        else:
            v = convert(value, tp, where)
            _check_choices(f, v, where)
            updates[name] = v
    for sec, given in flat.items():  # the flat spellings, each checked and named as the user wrote it
        current = updates.get(sec, getattr(obj, sec))
        updates[sec] = from_dict(hints[sec], {k: v for k, (v, _) in given.items()}, source, f"{sec}.", current,
                                 _labels={k: n for k, (_, n) in given.items()})
    return dataclasses.replace(obj, **updates)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (tuples become lists), for YAML/JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def load_file(path: str | os.PathLike) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict; errors name the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"{path}: --config is a folder, not a YAML/TOML file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif ext in (".yaml", ".yml", ".json"):
            import yaml
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        else:
            raise ConfigError(f"{path}: unknown config format '{ext}' (use .yaml, .yml or .toml)")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError carry the line number in their message
        raise ConfigError(f"{path}: cannot parse config: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping of field: value")
    return data


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as YAML (the file ``--config`` reads back)."""
    import yaml
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


# -------------------------------------------------------------------------------------------------------------- argparse

def _fmt_default(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) if v else "(empty)"
    if isinstance(v, str) and v == "":
        return "''"
    return str(v)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, _prefix: str = "", _defaults: Any = None) -> None:
    """Add ``--<field>`` for every field of ``cls`` (``--<section>.<field>`` for nested sections).

    Values are kept as strings (converted by ``parse_config``); the default is SUPPRESS so only given flags appear.
    """
    defaults = _defaults if _defaults is not None else cls()
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields" + (f" (section {_prefix.rstrip('.')})" if _prefix else ""),
                                      (cls.__doc__ or "").strip().split("\n")[0] or None)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, f"{_prefix}{f.name}.", default)
            continue
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        extra = f" choices: {list(choices)}." if choices else ""
        if range_rule(f):
            extra += f" must be {range_rule(f)}."
        names = [f"--{_prefix}{f.name}"]
        if "_" in f.name:
            names.append(f"--{_prefix}{f.name.replace('_', '-')}")
        kw: dict[str, Any] = dict(dest=f"{_prefix}{f.name}", default=argparse.SUPPRESS,
                                  help=f"{help_text} [{_type_name(tp)}, default: {_fmt_default(default)}]{extra}"
                                  .replace("%", "%%"))
        if tp is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar=_type_name(tp).upper().replace(" ", ""))
        group.add_argument(*names, **kw)
    if not _prefix:  # the flat spellings of section fields, accepted but not listed
        for flat, (sec, name) in flat_aliases(cls).items():
            tp = _hints(_hints(cls)[sec])[name]
            names = [f"--{flat}"] + ([f"--{flat.replace('_', '-')}"] if "_" in flat else [])
            kw = dict(dest=flat, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            if tp is bool:
                kw.update(nargs="?", const="true")
            parser.add_argument(*names, **kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # turn argparse's exit into an exception the CLI reports once
        raise ConfigError(f"command line: {message}")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    epilog = ("A field of a section is also accepted by its flat name (--lr for --optim.lr), as before sections."
              if flat_aliases(cls) else None)
    p = _Parser(prog=prog, description=description or (cls.__doc__ or "").strip(), epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or TOML file of field: value (command-line flags override it)")
    add_dataclass_args(p, cls)
    return p


def parse_config(cls: type, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """Defaults <- ``--config FILE`` <- ``--field value`` flags. Returns an instance of ``cls``.

    Raises ConfigError naming the field and the file/argument for unknown fields and bad values.
    ``--help`` prints every field with its type, default and meaning, then exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog=prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")]
        what = flags[0] if flags else unknown[0]
        raise ConfigError(f"command line: unknown field or argument '{what}' for {cls.__name__} "
                          f"(see --help for the fields)")
    cfg = cls()
    if ns.config:
        cfg = from_dict(cls, load_file(ns.config), source=ns.config)
    given = {k: v for k, v in vars(ns).items() if k != "config"}
    nested: dict = {}
    for dotted, value in given.items():
        d = nested
        parts = dotted.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    if nested:
        cfg = from_dict(cls, nested, source="command line", base=cfg)
    return cfg

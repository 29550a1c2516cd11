"""A study's settings, spelled once as a dataclass, to and from JSON and the command line (nanoGPT's config
idea; standard library only, so the studies, the CLI and the analysis side share it).

A study's command takes ``--config section.json`` (what the workflow writes from the user's config section)
plus one ``--<field>`` override per field, generated from the dataclass (:func:`add_settings`);
:func:`settings_from_args` builds the instance: the dataclass defaults, then the JSON file, then the flags
given. Unknown JSON keys are an error naming the known ones. :func:`setting` declares a field with its help.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def setting(default, help: str):
    """A dataclass field with its ``--help`` text (shown by :func:`add_settings`)."""
    return dataclasses.field(default=default, metadata={"help": help})

#
# A field whose type is itself a dataclass is a section (the config's nesting): its fields get flags
# ``--<section>-<field>`` (dest ``section.field``) and its JSON value is an object of any subset of them.
# On the command line an optional field (``X | None``) takes ``none`` (or ``null``) for None, as JSON's null
# does; a list field given with no values is the empty list. A field's help text is its
# ``metadata["help"]``. A ``Literal[...]`` field takes one of its values (flag choices; a JSON value outside
# them is an error), a fixed-length tuple (``tuple[float, float]``) exactly that many, and a field without
# a default must be given (in the JSON or as a flag).

class _ExplicitNone:
    """What the command line's ``none`` parses to, so that "given as None" differs from "not given"."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _unwrap(tp) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether ``None`` is allowed)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]), len(inner) < len(args)
    return tp, False


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(_unwrap(tp)[0])


def _arg_type(tp) -> tuple[Any, dict]:
    """(element type, extra add_argument kwargs) for a field's annotation."""
    tp, optional = _unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return str, {}
    if origin is typing.Literal:
        elem = type(args[0])
        return (_or_none(elem) if optional else elem), {"choices": list(args) + ([EXPLICIT_NONE] if optional else [])}
    if origin in (list, tuple):
        elem = _arg_type(args[0] if args else str)[0]
        fixed = origin is tuple and args and Ellipsis not in args  # tuple[float, float]: exactly two
        return (_or_none(elem) if optional and elem is not None else elem), {"nargs": len(args) if fixed else "*"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return (_or_none(tp) if optional else tp), {}
    return None, {}  # dicts and other structures: only through --config


def _or_none(elem):
    def parse(text: str):
        return EXPLICIT_NONE if text.lower() in ("none", "null") else elem(text)

    parse.__name__ = elem.__name__  # argparse names the type in its error message
    return parse


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def add_settings(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), doc: str = "") -> None:
    """``--config FILE.json`` plus one override flag per field of dataclass ``cls`` (``--a-field``; a nested
    section's field: ``--section-field``). ``skip``: field names (``section.field`` inside a section)."""
    p.add_argument("--config", metavar="JSON", help=f"{doc or cls.__name__} settings: a JSON file, or a JSON object "
                                                    "inline (any subset of the fields); flags given here override it")
    g = p.add_argument_group(f"{doc or cls.__name__} settings (override --config)")
    _add_fields(g, cls, "", skip)


def _add_fields(g, cls: type, prefix: str, skip: tuple[str, ...]) -> None:
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        name = prefix + f.name
        if name in skip:
            continue
        if _is_section(hints[f.name]):
            _add_fields(g, _unwrap(hints[f.name])[0], name + ".", skip)
            continue
        elem, extra = _arg_type(hints[f.name])
        if elem is None and "action" not in extra:
            continue
        default = _default(f)
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "empty"
        else:
            shown = "none" if default is None else default
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            shown = "required (here or in --config)"
        text = f.metadata.get("help", "")  # dataclasses.field(metadata={"help": ...})
        if "choices" in extra:
            text = "{" + ", ".join(str(c) for c in extra["choices"]) + "}" + (" " + text if text else "")
        kw: dict[str, Any] = {"dest": name, "default": None, "metavar": f.name.upper(),
                              "help": f"{text}{'; ' if text else ''}default: {shown}"}
        if elem is not None:
            kw["type"] = elem
        g.add_argument("--" + name.replace(".", "-").replace("_", "-"), **kw, **extra)


def _given(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The flags given on the command line, nested like the JSON (sections as dicts)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in _fields(cls):
        if _is_section(hints[f.name]):
            sub = _given(_unwrap(hints[f.name])[0], args, prefix + f.name + ".")
            if sub:
                out[f.name] = sub
            continue
        v = getattr(args, prefix + f.name, None)
        if v is None:
            continue
        if v is EXPLICIT_NONE or (isinstance(v, list) and EXPLICIT_NONE in v):
            v = None
        out[f.name] = v
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_settings(cls: type, values: dict[str, Any], *, base=None, where: str = ""):
    """An instance of ``cls`` from ``values`` over ``base`` (an instance; default: the dataclass defaults).
    A section may be given as a dict of some of its fields; lists become tuples where the field is a tuple;
    ``None`` for a field that does not allow it is an error naming the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    _check_keys(cls, values, where)
    if base is None:
        missing = [k for k, f in fields.items() if k not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} setting(s) {', '.join(where + k for k in missing)} must be given "
                             f"(in the --config JSON or as --{missing[0].replace('_', '-')})")
    kw: dict[str, Any] = {}
    for k, v in values.items():
        tp, optional = _unwrap(hints[k])
        if v is not None and typing.get_origin(tp) is typing.Literal and v not in typing.get_args(tp):
            raise ValueError(f"{cls.__name__} setting {where}{k} = {v!r}; choose one of "
                             f"{', '.join(map(repr, typing.get_args(tp)))}")
        if v is None:
            if not optional:
                raise ValueError(f"{cls.__name__} setting {where}{k} cannot be None (null)")
        elif dataclasses.is_dataclass(tp) and isinstance(v, dict):
            current = getattr(base, k) if base is not None else _default(fields[k])
            v = build_settings(tp, v, base=current if dataclasses.is_dataclass(current) else None,
                               where=f"{where}{k}.")
        elif isinstance(v, (list, tuple)) and typing.get_origin(tp) in (list, tuple):
            v = (tuple if typing.get_origin(tp) is tuple else list)(v)
        kw[k] = v
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)


def settings_from_args(cls: type, args: argparse.Namespace, **fixed):
    """An instance of ``cls``: its defaults, then ``args.config`` (JSON), then the flags given, then ``fixed``."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_settings(cls, args.config))
    values = _merge(values, _given(cls, args))
    values.update(fixed)
    return build_settings(cls, values)


def settings_dict(settings) -> dict[str, Any]:
    """A settings instance as the JSON object :func:`read_settings` reads back (sections nested)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def _check_keys(cls: type, data: dict, where: str = "", path: str | Path | None = None) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{path or cls.__name__}: expected a JSON object of {cls.__name__} settings"
                         + (f" for {where.rstrip('.')}" if where else ""))
    known = {f.name for f in _fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{str(path) + ': ' if path else ''}unknown {cls.__name__} setting(s) "
                         f"{', '.join(where + u for u in unknown)}; known: {', '.join(where + k for k in sorted(known))}")


def read_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The fields of ``cls`` given in a JSON file, or inline as a JSON object (text starting with ``{``, as the
    workflow passes them); an error names unknown keys and the known ones, also inside a section."""
    text = str(path)
    data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(path).read_text())
    path = "--config" if text.lstrip().startswith("{") else path
    _check_tree(cls, data, "", path)
    return data


def _check_tree(cls: type, data, where: str, path) -> None:
    _check_keys(cls, data, where, path)
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if _is_section(hints[k]) and v is not None:
            _check_tree(_unwrap(hints[k])[0], v, f"{where}{k}.", path)

"""Flags built from the settings' dataclasses: a field's default and help are written once, in the field
(``field(default=..., metadata={"help": ...})``), and the parser takes both from there. The "(default ...)" of a
help text is added here, from the field's own default.

Metadata a field may carry besides ``help``: ``flag`` (its spelling, when not ``--<name>``: ``--model_dim`` is
ModelConfig.d_model, the design's name), ``metavar``, ``choices``, ``default_help`` (what the default means, when
its value alone does not say: ``None`` for "the shipped GPT-2"), and ``negate`` (a bool that is on by default and
switched off by its flag: ``--no_amp``).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def field_type(f: Field) -> type:
    """The type a flag parses, from the field's annotation (``int``, ``str | None``, ...)."""
    names = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
    return TYPES[names[0]]


def default_text(f: Field) -> str:
    meta = f.metadata
    if "default_help" in meta:
        return f" (default: {meta['default_help']})"
    if f.default is MISSING:
        return ""
    if field_type(f) is bool:
        return f" (default {'on' if f.default != bool(meta.get('negate')) else 'off'})"
    return f" (default {f.default})"


def add_fields(
    group,
    cls,
    *,
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    unset_default: bool = False,
    help_for: dict | None = None,
) -> list[str]:
    """Adds a flag for every field of ``cls`` with a ``help`` (or the ones named in ``only``) to ``group``; returns
    the fields added. ``unset_default``: every flag's default is None, so a caller can tell a flag given from one
    left out (the model flags on --resume), and booleans get --x / --no-x. ``help_for``: field -> a help text
    computed at run time (the ILT kinds' list)."""
    added = []
    for f in fields(cls):
        if "help" not in f.metadata or (only is not None and f.name not in only) or f.name in exclude:
            continue
        meta, typ = f.metadata, field_type(f)
        text = (help_for or {}).get(f.name) or meta["help"]
        kwargs = {"dest": f.name, "help": text + default_text(f)}
        if typ is bool and unset_default:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif typ is bool:
            kwargs.update(action="store_false" if meta.get("negate") else "store_true")
        else:
            required = f.default is MISSING and f.default_factory is MISSING
            default = None if unset_default or required else f.default
            kwargs.update(type=typ, default=default, required=required and not unset_default)
            for key in ("metavar", "choices"):
                if key in meta:
                    kwargs[key] = meta[key]
        group.add_argument(meta.get("flag", f"--{f.name}"), **kwargs)
        added.append(f.name)
    return added


def values(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names}

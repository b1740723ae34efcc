"""How the CLI prints what the API returns, as kubectl and velero do: ``-o json|yaml`` (the API's
objects as they are), ``-o name`` (one name per line, to feed back to the CLI), and a plain table
(``-o wide`` adds columns). Tables are never cut and never drawn with box characters, so a pipe
into ``grep``/``awk`` sees every column in full. Pure: returns text, prints nothing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("json", "yaml", "wide", "name")

Item = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Item], object]
    wide: bool = False  # only with -o wide


@dataclass(frozen=True)
class View:
    """How one kind of object looks in a table, and its name for ``-o name``."""

    columns: tuple[Column, ...]
    name: Callable[[Item], str] | None  # None: the object has no name (-o name is refused)


class UnsupportedFormat(ValueError):
    pass


_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./:@+-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return json.dumps(v)
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _RESERVED:
        return s
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(v: Any, indent: str = "") -> list[str]:
    """Block-style YAML of JSON data (what the API returns), keys sorted as -o json sorts them."""
    if isinstance(v, dict) and v:
        out = []
        for k in sorted(v):
            item = v[k]
            if isinstance(item, dict | list) and item:
                out.append(f"{indent}{_scalar(str(k))}:")
                out += to_yaml(item, indent + ("" if isinstance(item, list) else "  "))
            else:
                out.append(f"{indent}{_scalar(str(k))}: {_scalar_or_empty(item)}")
        return out
    if isinstance(v, list) and v:
        out = []
        for item in v:
            sub = to_yaml(item, indent + "  ")
            out.append(f"{indent}- {sub[0].lstrip()}")
            out += sub[1:]
        return out
    return [indent + _scalar_or_empty(v)]


def _scalar_or_empty(v: Any) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return _scalar(v)


def table(items: Sequence[Item], columns: Sequence[Column], wide: bool = False) -> str:
    """kubectl's layout: upper-case headers, columns padded to their widest cell and three spaces
    apart, the last one unpadded; no cell is ever shortened."""
    cols = [c for c in columns if wide or not c.wide]
    rows = [[c.header for c in cols]] + [["" if (v := c.value(it)) is None else str(v) for c in cols]
                                         for it in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def render(data: Any, fmt: str | None, view: View | None = None,
           human: Callable[[Any], str] | None = None, name: Callable[[Any], str] | None = None) -> str:
    """``data`` (one object or a list of them) in format ``fmt`` (None: the default table or the
    ``human`` one-liner; without either, JSON)."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    if fmt == "yaml":
        return "\n".join(to_yaml(data))
    items = data if isinstance(data, list) else [data]
    if fmt == "name":
        namer = name or (view.name if view else None)
        if namer is None:
            raise UnsupportedFormat("-o name is not available for this command")
        return "\n".join(namer(it) for it in items)
    if view is not None:
        return table(items, view.columns, wide=fmt == "wide")
    if human is not None:
        return human(data)
    return json.dumps(data, indent=2, sort_keys=True)

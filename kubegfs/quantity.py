"""Byte sizes written as Kubernetes resource quantities, the syntax users already type in their
manifests: ``65536``, ``64Mi`` (2^20), ``64M`` (10^6), ``1Gi``, ``1.5Gi``, ``1e9``.

Only whole bytes are sizes: ``1m`` (a thousandth, in Kubernetes) and ``0.5`` are refused, and so
are ``64MiB``/``64mb``, which Kubernetes does not accept and whose meaning readers guess
differently. Pure; used by the CLI. The chart's values schema admits the integer subset
(``64Mi``, ``500M``), all of which this accepts."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
# the same grammar as values.schema.json's "quantity" pattern (without the leading sign)
PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][0-9]+)?$"
EXAMPLES = "e.g. 65536, 64Mi, 1Gi, 500M"


class BadQuantity(ValueError):
    pass


def parse_bytes(text: str | int) -> int:
    """The number of bytes ``text`` means; :class:`BadQuantity` if it is not a whole-byte quantity."""
    if isinstance(text, int):
        if text < 0:
            raise BadQuantity(f"bad size {text}: negative")
        return text
    m = re.match(PATTERN, text.strip())
    if not m:
        raise BadQuantity(f"bad size {text!r} ({EXAMPLES}; Mi/Gi are powers of 2, M/G of 10)")
    suffix = m.group(3) or ""
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
        raise BadQuantity(f"bad size {text!r}") from exc
    if suffix[:1] in ("e", "E"):
        value = number * (Decimal(10) ** int(suffix[1:]))
    else:
        value = number * (BINARY.get(suffix) or DECIMAL[suffix])
    if value != value.to_integral_value():
        raise BadQuantity(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def format_bytes(n: int) -> str:
    """The shortest exact binary quantity for ``n`` (``67108864`` -> ``64Mi``)."""
    for suffix, mult in reversed(BINARY.items()):
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)

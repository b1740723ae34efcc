"""Sizes are Kubernetes quantities: Mi is 2^20, M is 10^6, and nothing is guessed."""

import pytest

from kubegfs.quantity import BadQuantity, format_bytes, parse_bytes


@pytest.mark.parametrize(("text", "n"), [
    ("65536", 65536), ("64Mi", 64 << 20), ("64M", 64_000_000), ("1Gi", 1 << 30), ("1G", 10**9),
    ("4Ki", 4096), ("4k", 4000), ("1.5Gi", 3 << 29), ("1e6", 10**6), (" 2Ti ", 2 << 40), (7, 7),
])
def test_quantities(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["64MiB", "64mb", "1m", "0.5", "1.1Ki", "-1", "", "Mi", "64 Mi", "1K", "12x"])
def test_refused(text):
    with pytest.raises(BadQuantity):
        parse_bytes(text)


def test_format_round_trips():
    for n in (0, 1, 1000, 4096, 64 << 20, 3 << 29, 5 << 40):
        assert parse_bytes(format_bytes(n)) == n
    assert format_bytes(64 << 20) == "64Mi"

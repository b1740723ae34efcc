"""Writes tests/data/blocks-v2.* (run once by main at 0b901fe, block format 2, LEAF_BITS 4):
``PYTHONPATH=<a checkout of 0b901fe> python tests/data/make_blocks_v2.py tests/data``. Kept to say
how the checked-in blocks were made; a version writing another block format refuses to run it."""

import json
import sys
from pathlib import Path

import immutables

from kubegfs import merkle
from kubegfs import namespace as ns

assert merkle.BLOCK_FORMAT == 2 and merkle.LEAF_BITS == 4
out = Path(sys.argv[1])
V: dict[int, int] = {}
h = 0x1_0000_0001


def files(prefix: str, n: int, mtime: int) -> list[tuple[str, ns.File]]:
    global h
    kids = []
    for i in range(n):
        chunks = tuple(range(h, h + (i % 3)))
        for c in chunks:
            V[c] = 1 + c % 4
        h += len(chunks)
        kids.append((f"{prefix}{i:04d}-{(i * 2654435761) % 99991:05d}.dat",
                     ns.File(1000 * i + 7, mtime + i, 0o644, chunks)))
    return kids


big = ns.Dir(immutables.Map(files("part-", 300, 1_700_000_000_000_000_000)), 1_700_000_000_500_000_000, 0o755)
mid = ns.Dir(immutables.Map(files("m-", 40, 1_700_000_001_000_000_000)), 1_700_000_001_500_000_000, 0o750)
small = ns.Dir(immutables.Map(files("s-", 3, 1_700_000_002_000_000_000)), 1_700_000_002_500_000_000, 0o700)
root = ns.Dir(immutables.Map({"big": big, "mid": mid, "logs": ns.Dir(immutables.Map({"small": small}), 5, 0o755),
                             "top.txt": ns.File(3, 4, 0o600, ())}), 1_700_000_003_000_000_000, 0o755)


def vo(c: int) -> int:
    return V.get(c, 0)


dg = merkle.digest(root, vo)
blocks = [(d, b) for d, b, _n in merkle.iter_blocks(root, vo, lambda _d: False)]
(out / "blocks-v2.blocks").write_bytes(merkle.pack_frames(blocks))
flat = [["/" + "/".join(p), "f" if isinstance(n, ns.File) else "d", n.mode, n.mtime,
         getattr(n, "size", None), list(getattr(n, "chunks", ()))] for p, n in ns.walk(root)]
kinds: dict[int, int] = {}
for _d, b in blocks:
    k = merkle.decode_block(b).kind
    kinds[k] = kinds.get(k, 0) + 1
(out / "blocks-v2.json").write_text(json.dumps({
    "written_by": "kubegfs main 0b901fe (block format 2: LEAF_BITS 4, FANOUT_BITS 3, no HEAD_MAX)",
    "root": dg.hex(), "heads": kinds.get(0, 0), "sub_blocks": kinds.get(1, 0),
    "big_head": merkle.digest(big, vo).hex(), "versions": {f"{c:x}": v for c, v in sorted(V.items())},
    "tree": flat}, indent=0) + "\n")
print(dg.hex(), len(blocks), kinds)

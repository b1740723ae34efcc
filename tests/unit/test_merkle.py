"""Merkle directory blocks and snapshot diff: canonical digests, memoisation, diff completeness."""

import random
import zlib

import immutables
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.errors import CorruptData
from kubegfs.formats import unpackb
from kubegfs.snapdiff import diff_steps, run, summarize


def V(h):
    return h % 5 + 1


NAMES = ["a", "b", "c", "log", "data", "x.bin", "é", "z"]


def random_spec(rng, depth=0, handles=None):
    """A nested dict: name -> ("f", size, mtime, mode, chunks) | dict (with "." -> (mode, mtime))."""
    handles = handles if handles is not None else iter(range(1, 10**9))
    spec = {".": (rng.choice([0o755, 0o700]), rng.randrange(1, 50))}
    if rng.random() < 0.15:  # a big directory: split into sub-blocks
        for j in rng.sample(range(1000), rng.randrange(20, 400)):
            spec[f"n{j}"] = ("f", rng.randrange(0, 3), rng.randrange(1, 50), 0o644,
                             tuple(next(handles) for _ in range(rng.randrange(0, 2))))
    for name in rng.sample(NAMES, rng.randrange(0, 5)):
        if depth < 3 and rng.random() < 0.35:
            spec[name] = random_spec(rng, depth + 1, handles)
        else:
            spec[name] = ("f", rng.randrange(0, 3), rng.randrange(1, 50), 0o644,
                          tuple(next(handles) for _ in range(rng.randrange(0, 3))))
    return spec


def build_direct(spec):
    kids = {}
    for name, v in spec.items():
        if name == ".":
            continue
        kids[name] = build_direct(v) if isinstance(v, dict) else ns.File(v[1], v[2], v[3], v[4])
    mode, mtime = spec["."]
    return ns.Dir(immutables.Map(kids), mtime, mode)


def _dirs(spec, parts=()):
    yield parts, spec
    for name, v in spec.items():
        if isinstance(v, dict) and name != ".":
            yield from _dirs(v, parts + (name,))


def build_with_history(spec, rng):
    """The same content through a random order of namespace operations, with detours (files
    created then removed, directories moved away and back) and digests taken along the way."""
    root = ns.empty_root(0)
    items = [(parts, None) for parts, _ in _dirs(spec) if parts]
    for parts, d in _dirs(spec):
        for name, v in d.items():
            if name != "." and not isinstance(v, dict):
                items.append((parts + (name,), v))
    rng.shuffle(items)
    for parts, v in items:
        for i in range(1, len(parts)):
            root = ns.mkdir(root, parts[:i], rng.randrange(100), 0o711, True)
        if v is None:
            root = ns.mkdir(root, parts, rng.randrange(100), 0o711, True)
        else:
            root = ns.replace(root, parts, ns.File(v[1], v[2], v[3], v[4]), rng.randrange(100))
        if rng.random() < 0.3:
            merkle.digest(root, V)
        if rng.random() < 0.2:  # a detour
            root = ns.replace(root, ("tmp-detour",), ns.File(1, 1, 1, (999,)), 7)
            merkle.digest(root, V)
            root = ns.replace(root, ("tmp-detour",), None, 8)
    for parts, d in sorted(_dirs(spec), key=lambda x: -len(x[0])):  # every directory's own metadata
        node = ns.must_dir(root, parts)
        mode, mtime = d["."]
        parent_mtime = ns.must_dir(root, parts[:-1]).mtime if parts else 0
        root = ns.replace(root, parts, ns.Dir(node.children, mtime, mode), parent_mtime)
    return root


@settings(max_examples=80, deadline=None)
@given(st.randoms(use_true_random=False))
def test_same_content_same_digest_whatever_the_history(rng):
    spec = random_spec(rng)
    direct = build_direct(spec)
    hist = build_with_history(spec, rng)
    assert merkle.digest(hist, V) == merkle.digest(direct, V)


@settings(max_examples=80, deadline=None)
@given(st.randoms(use_true_random=False))
def test_different_content_different_digest(rng):
    spec = random_spec(rng)
    before = merkle.digest(build_direct(spec), V)
    _parts, d = rng.choice(list(_dirs(spec)))
    mode, mtime = d["."]
    d["."] = (mode, mtime + 1) if rng.random() < 0.5 else (mode ^ 0o1, mtime)
    assert merkle.digest(build_direct(spec), V) != before


def test_versions_are_part_of_the_block():
    root = build_direct({".": (0o755, 1), "f": ("f", 1, 1, 0o644, (7,))})
    assert merkle.digest(root, lambda h: 1) != merkle.digest(build_direct(
        {".": (0o755, 1), "f": ("f", 1, 1, 0o644, (7,))}), lambda h: 2)


def test_a_mutation_reencodes_only_its_path():
    spec = random_spec(random.Random(3))
    root = build_direct({".": (0o755, 1), "d1": {".": (0o755, 1), "d2": spec}, "side": spec})
    merkle.digest(root, V)
    new = ns.replace(root, ("d1", "d2", "new"), ns.File(1, 1, 0o644, ()), 5)
    unset = [p for p, n in ns.walk(new) if isinstance(n, ns.Dir) and n.digest is None]
    assert unset == [(), ("d1",), ("d1", "d2")]
    encoded = []
    real = merkle.dir_blocks
    try:
        merkle.dir_blocks = lambda d, v, c: encoded.append(d) or real(d, v, c)
        merkle.digest(new, V)
    finally:
        merkle.dir_blocks = real
    assert len(encoded) == 3


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_blocks_round_trip_and_verify(rng):
    root = build_direct(random_spec(rng))
    have = {dg: data for dg, data, _n in merkle.iter_blocks(root, V, lambda _d: False)}
    for dg, data, node in merkle.iter_blocks(root, V, lambda _d: False):
        blk = merkle.decode_block(data, dg)
        assert dg == merkle.block_digest(data)
        # the info kept from encoding (children, chunk handles) is what the bytes say
        assert merkle.dir_blocks(node, V, lambda c: merkle.digest(c, V)).infos[dg] == merkle.block_info(data)
        if blk.kind == merkle.KIND_DIR:
            assert dg == node.digest
            assert merkle.whole_dir(dg, have) == _strip(merkle.block_of(node, V))
        else:
            assert node.digest != dg and (blk.entries or blk.parts) and not (blk.entries and blk.parts)
        assert merkle.child_digests(data) == [e.digest for e in blk.entries.values()
                                              if isinstance(e, merkle.DirRef)] + list(blk.parts)
        bad = bytearray(data)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptData):
            merkle.decode_block(bytes(bad), dg)


def _strip(block):
    return merkle.Block(block.mode, block.mtime, {
        n: merkle.DirRef(e.digest) if isinstance(e, merkle.DirRef) else e for n, e in block.entries.items()})


@pytest.mark.parametrize("decode", [merkle.decode_block, merkle.unpack_frames, merkle.child_digests])
@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=300))
def test_block_decoders_reject_garbage_cleanly(decode, blob):
    try:
        decode(blob)
    except CorruptData:
        pass


def test_iter_blocks_skips_what_a_holder_has():
    spec = random_spec(random.Random(5))
    a = build_direct({".": (0o755, 1), "x": spec, "y": {".": (0o755, 2)}})
    have = {dg for dg, _b, _n in merkle.iter_blocks(a, V, lambda _d: False)}
    b = ns.replace(a, ("y", "new"), ns.File(1, 2, 0o644, (5,)), 3)
    shipped = [n for _dg, _b, n in merkle.iter_blocks(b, V, have.__contains__)]
    assert shipped == [ns.must_get(b, ("y",)), b]  # children first, the unchanged x not at all



def test_a_digest_pass_keeps_what_it_encoded_for_shipping(monkeypatch):
    """A build's digest pass records every directory it encodes, so shipping reads the blocks
    from there and encodes nothing again, even when the bounded cache has dropped them."""
    big = {".": (0o755, 1), **{f"f{i:03d}": ("f", i, 7, 0o644, (i,)) for i in range(200)}}  # sub-blocks
    root = build_direct({".": (0o755, 1), "big": big, "x": random_spec(random.Random(9)), "y": {".": (0o755, 2)}})
    kept: merkle.Kept = {}
    merkle.digest(root, V, kept)
    dirs = [n for _p, n in ns.walk(root) if isinstance(n, ns.Dir)] + [root]
    assert set(kept) == {merkle.digest(d, V) for d in dirs}
    assert kept[merkle.digest(ns.must_get(root, ("big",)), V)].parts  # split, and kept whole
    want = [(dg, b) for dg, b, _n in merkle.iter_blocks(root, V, lambda _d: False)]
    monkeypatch.setattr(merkle, "_CACHE", {})
    monkeypatch.setattr(merkle, "dir_blocks", lambda *a: pytest.fail("encoded again"))
    assert [(dg, b) for dg, b, _n in merkle.iter_blocks(root, V, lambda _d: False, kept)] == want
    merkle.digest(root, V, kept2 := {})  # memoised: nothing encoded, nothing kept
    assert kept2 == {}


# --------------------------------------------------------------------------- diff


def mutate(root, rng, n):
    handles = iter(range(10**6, 10**7))
    for _ in range(n):
        every = list(ns.walk(root))
        dirs = [p for p, x in every if isinstance(x, ns.Dir)]
        files = [p for p, x in every if isinstance(x, ns.File)]
        op = rng.choice(["write", "write", "rm", "mv", "mkdir", "touchdir"])
        t = rng.randrange(100, 200)
        if op == "write" or (op in ("rm", "mv") and not files and len(dirs) < 2):
            parent = rng.choice(dirs)
            name = rng.choice(NAMES)
            if isinstance(ns.get(root, parent + (name,)), ns.Dir):
                continue
            root = ns.replace(root, parent + (name,), ns.File(rng.randrange(3), t, 0o644,
                              tuple(next(handles) for _ in range(rng.randrange(3)))), t)
        elif op == "rm":
            victim = rng.choice(files + dirs[1:])
            root = ns.replace(root, victim, None, t)
        elif op == "mv":
            src = rng.choice(files + dirs[1:])
            dst = rng.choice(dirs) + (rng.choice(NAMES) + "-mv",)
            if dst[: len(src)] == src or ns.get(root, dst) is not None:
                continue
            node = ns.must_get(root, src)
            root = ns.replace(ns.replace(root, src, None, t), dst, node, t)
        elif op == "mkdir":
            parent = rng.choice(dirs)
            if ns.get(root, parent + ("nd",)) is None:
                root = ns.mkdir(root, parent + ("nd",), t, 0o755, False)
        else:
            p = rng.choice(dirs)
            d = ns.must_dir(root, p)
            root = ns.replace(root, p, ns.Dir(d.children, t, d.mode), ns.must_dir(root, p[:-1]).mtime if p else 0)
    return root


def live_loader(refs):
    return [merkle.block_of(r.node, V) for _side, r in refs]


def block_loader(*trees, seen=None):
    """Blocks by digest (as from a chunkserver); the references carry no node."""
    store = {dg: data for t in trees for dg, data, _n in merkle.iter_blocks(t, V, lambda _d: False)}

    def load(refs):
        if seen is not None:
            seen.extend(r.digest for _side, r in refs)
        return [merkle.decode_block(store[r.digest], r.digest) for _side, r in refs]
    return load


def diff_trees(a, b, in_memory=True):
    if in_memory:
        return run(diff_steps(merkle.DirRef(merkle.digest(a, V), a), merkle.DirRef(merkle.digest(b, V), b)),
                   live_loader)
    return run(diff_steps(merkle.DirRef(merkle.digest(a, V)), merkle.DirRef(merkle.digest(b, V))),
               block_loader(a, b))


def to_dict(node):
    if isinstance(node, ns.File):
        return ("f", node.size, node.mtime, node.mode, node.chunks)
    return {".": (node.mode, node.mtime), **{n: to_dict(c) for n, c in node.children.items()}}


def entry_dict(e):
    if isinstance(e, merkle.FileEntry):
        return ("f", e.size, e.mtime, e.mode, e.chunks)
    return to_dict(e.node)


def _split(path):
    return [p for p in path.split("/")[1:]]


def _at(tree, parts):
    for p in parts:
        tree = tree[p]
    return tree


def apply_changes(a_dict, changes):
    """Apply a diff report to a tree (as nested dicts); used to check the report is complete."""
    stash = {}
    for c in changes:
        if c.kind == "R":
            parts = _split(c.path)
            stash[c.to] = _at(a_dict, parts[:-1]).pop(parts[-1])
    for c in changes:
        if c.kind == "-":
            parts = _split(c.path)
            del _at(a_dict, parts[:-1])[parts[-1]]
    for c in changes:
        if c.kind == "+":
            parts = _split(c.path)
            _at(a_dict, parts[:-1])[parts[-1]] = entry_dict(c.new)
        elif c.kind == "R":
            parts = _split(c.to)
            _at(a_dict, parts[:-1])[parts[-1]] = stash[c.to]
    for c in changes:
        if c.kind == "M" and c.type == "file":
            parts = _split(c.path)
            _at(a_dict, parts[:-1])[parts[-1]] = entry_dict(c.new)
        elif c.kind == "M":
            _at(a_dict, _split(c.path))["."] = (c.mode, c.mtime)
    return a_dict


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 12), st.booleans())
def test_diff_applied_to_a_gives_b(rng, n, in_memory):
    a = build_direct(random_spec(rng))
    b = mutate(a, rng, n)
    changes = diff_trees(a, b, in_memory)
    if not in_memory:  # the same report either way
        assert [c.line() for c in changes] == [c.line() for c in diff_trees(a, b)]
        changes = [c if c.new is None or not isinstance(c.new, merkle.DirRef) or c.kind == "M"
                   else _with_node(c, b) for c in changes]
    assert apply_changes(to_dict(a), changes) == to_dict(b)
    if merkle.digest(a, V) == merkle.digest(b, V):
        assert changes == []
    s = summarize(changes)
    assert s.created + s.deleted + s.modified + s.renamed == len(changes)


def _with_node(c, b):
    """A created directory from blocks carries only its digest: find its node in ``b`` to apply it."""
    import dataclasses

    node = ns.must_get(b, tuple(_split(c.to or c.path)))
    return dataclasses.replace(c, new=merkle.DirRef(c.new.digest, node))


def test_diff_report_names_renames_and_descends_only_into_changes():
    big = {".": (0o755, 1), **{f"f{i}": ("f", 1, 1, 0o644, (i + 1,)) for i in range(50)}}
    a = build_direct({".": (0o755, 1), "keep": big, "work": {".": (0o755, 1), "old.txt": ("f", 3, 1, 0o644, (900,)),
                                                              "gone": ("f", 0, 1, 0o644, ())}})
    b = ns.replace(a, ("work", "old.txt"), None, 5)
    b = ns.replace(b, ("work", "new.txt"), ns.must_get(a, ("work", "old.txt")), 5)
    b = ns.replace(b, ("work", "gone"), None, 5)
    b = ns.replace(b, ("work", "made"), ns.File(1, 5, 0o644, (901,)), 5)
    want = ["M\t./work", "-\t./work/gone", "+\t./work/made", "R\t./work/old.txt -> ./work/new.txt"]
    assert [c.line() for c in diff_trees(a, b)] == want
    loaded = []
    changes = run(diff_steps(merkle.DirRef(merkle.digest(a, V)), merkle.DirRef(merkle.digest(b, V))),
                  block_loader(a, b, seen=loaded))
    assert [c.line() for c in changes] == want
    assert ns.must_get(a, ("keep",)).digest not in loaded  # the unchanged directory: never read
    assert len(loaded) == 4  # the two roots and the two work/


# --------------------------------------------------------------------------- big directories


def assemble_fetching(root, held, live, version_of):
    """The tree ``root`` names assembled over ``live``, the blocks it asks for taken from ``held``."""
    have: dict = {}
    while True:
        try:
            return merkle.assemble(root, have, live, version_of)[0]
        except merkle.NeedBlocks as need:
            have.update({d: held[d] for d in need.digests})


def big_dir(n, rng, prefix="file-"):
    return ns.Dir(immutables.Map({f"{prefix}{rng.getrandbits(40):010x}.dat": ns.File(rng.randrange(1 << 20), 5, 0o644,
                                                                                    (i + 1,))
                                  for i in range(n)}), 3, 0o755)


def test_runs_end_at_name_boundaries_or_the_cap():
    t = merkle.threshold(0)
    assert merkle.runs([0, t, 0, 0, t + 5, 0], 0) == [2, 5, 6]
    assert merkle.runs([t, t], 0) == [1, 2]  # the last run ends at the end, boundary or not
    assert merkle.runs([0] * (2 * merkle.MAX_RUN + 1), 0) == [merkle.MAX_RUN, 2 * merkle.MAX_RUN,
                                                            2 * merkle.MAX_RUN + 1]
    assert merkle.runs([t], 1) == [1] and merkle.runs([t, 0], 1) == [2]  # a leaf boundary is not an index one


def test_a_big_directory_is_split_and_a_change_reencodes_a_path_of_small_blocks():
    rng = random.Random(11)
    d = big_dir(5000, rng)
    head, parts, *_rest = merkle.dir_blocks(d, V, lambda c: merkle.digest(c, V))
    assert len(parts) > 5000 >> (merkle.LEAF_BITS + 1)
    have = {merkle.block_digest(head): head, **dict(parts)}
    whole = sum(len(merkle.compress(b)) for b in have.values())
    name = sorted(d.children)[1234]
    f = d.children[name]
    d2 = ns.replace(d, (name,), ns.File(f.size + 1, f.mtime, f.mode, f.chunks), 3)
    new = [(dg, b) for dg, b, _n in merkle.iter_blocks(d2, V, have.__contains__)]
    levels = 1
    while merkle.threshold(levels) <= 32 and len(parts) >> (merkle.FANOUT_BITS * levels):
        levels += 1
    assert 2 <= len(new) <= 1 + levels  # the leaf, an index sub-block per level, the head
    assert sum(len(merkle.compress(b)) for _dg, b in new) * 50 < whole
    assert new[-1][0] == merkle.digest(d2, V)
    # inserting a name moves at most the boundaries around it
    d3 = ns.replace(d, ("file-new.dat",), ns.File(1, 1, 0o644, ()), 3)
    new3 = [dg for dg, _b, _n in merkle.iter_blocks(d3, V, have.__contains__)]
    assert len(new3) <= 2 + levels


def test_names_that_never_hit_a_boundary_are_cut_at_the_cap():
    names = []
    i = 0
    while len(names) < merkle.MAX_RUN * 2 + 10:
        n = f"n{i}"
        if merkle.name_rank(n) < merkle.threshold(0):
            names.append(n)
        i += 1
    d = ns.Dir(immutables.Map({n: ns.File(0, 1, 0o644, ()) for n in names}), 1, 0o755)
    head, parts, *_rest = merkle.dir_blocks(d, V, lambda c: merkle.digest(c, V))
    sizes = sorted(len(merkle.decode_block(b).entries) for _p, b in parts)
    assert sizes == [10, merkle.MAX_RUN, merkle.MAX_RUN]
    have = {merkle.block_digest(head): head, **dict(parts)}
    assert list(merkle.whole_dir(merkle.block_digest(head), have).entries) == sorted(names)


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_a_big_directory_digest_is_canonical_whatever_the_order_of_inserts_and_removals(rng):
    d = big_dir(rng.randrange(50, 600), rng)
    names = list(d.children)
    rng.shuffle(names)
    root = ns.empty_root(3)
    extra = [f"tmp{i}" for i in range(rng.randrange(0, 40))]
    for n in names + extra:  # in random order, with detours, digests taken along the way
        root = ns.replace(root, (n,), d.children.get(n) or ns.File(9, 9, 0o600, ()), 3)
        if rng.random() < 0.05:
            merkle.digest(root, V)
    for n in extra:
        root = ns.replace(root, (n,), None, 3)
    assert merkle.digest(root, V) == merkle.digest(d, V)


def test_diff_of_a_big_directory_reads_only_the_sub_blocks_that_differ():
    rng = random.Random(4)
    a = ns.Dir(immutables.Map({"big": big_dir(3000, rng)}), 1, 0o755)
    name = sorted(ns.must_dir(a, ("big",)).children)[100]
    b = ns.replace(a, ("big", name), ns.File(7, 7, 0o644, (99999,)), 3)  # (big keeps its mtime)
    loaded = []
    changes = run(diff_steps(merkle.DirRef(merkle.digest(a, V)), merkle.DirRef(merkle.digest(b, V))),
                  block_loader(a, b, seen=loaded))
    assert [c.line() for c in changes] == [f"M\t./big/{name}"]
    n_blocks = sum(1 for _ in merkle.iter_blocks(a, V, lambda _d: False))
    assert len(loaded) <= 2 * 5 and n_blocks > 100


def test_a_sub_block_is_not_a_directory_and_sub_blocks_must_be_in_order():
    rng = random.Random(2)
    d = big_dir(400, rng)
    head, parts, *_rest = merkle.dir_blocks(d, V, lambda c: merkle.digest(c, V))
    have = dict(parts)
    with pytest.raises(CorruptData):
        merkle.whole_dir(parts[0][0], have)
    hd = merkle.block_digest(head)
    have[hd] = head
    raw = merkle.unpackb(head)
    raw[13] = b"".join(reversed([raw[13][i:i + 32] for i in range(0, len(raw[13]), 32)]))
    swapped = merkle.packb(raw)
    have[merkle.block_digest(swapped)] = swapped
    assert len(raw[13]) > 32  # a split directory's head names two or more sub-blocks
    with pytest.raises(CorruptData):
        merkle.whole_dir(merkle.block_digest(swapped), have)


def test_encoded_blocks_are_cached_by_digest_within_a_bound(monkeypatch):
    monkeypatch.setattr(merkle, "_CACHE", {})
    monkeypatch.setattr(merkle, "_cache_bytes", 0)
    monkeypatch.setattr(merkle, "_CACHE_LIMIT", 150_000)
    rng = random.Random(8)
    dirs = [big_dir(200, rng, prefix=f"d{i}-") for i in range(20)]
    for d in dirs:
        merkle.digest(d, V)
    assert 0 < len(merkle._CACHE) < 20 and merkle._cache_bytes <= 150_000
    for d in dirs:  # from the cache or encoded again: the same blocks
        assert merkle.blocks_of_dir(d, V) == merkle.dir_blocks(d, V, lambda c: merkle.digest(c, V))


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_assembling_a_big_directory_over_a_changed_live_one_gives_the_snapshot(rng):
    big = big_dir(rng.randrange(20, 500), rng)
    for i in range(rng.randrange(0, 4)):  # a few subdirectories among the files
        big = ns.replace(big, (f"file-sub{i}",), build_direct(random_spec(rng, 2)), 3)
    snap = ns.Dir(immutables.Map({"big": big}), 1, 0o755)
    if rng.random() < 0.7:  # digested before the changes: the live directory's digest pass encodes
        merkle.digest(snap, V)  # only what changed (its blocks are not whole)
    live = snap
    names = sorted(big.children)
    for i in range(rng.randrange(0, 30)):
        if i == 10 and rng.random() < 0.5:
            merkle.digest(live, V)  # and again in between
        op = rng.random()
        if op < 0.4:
            live = ns.replace(live, ("big", rng.choice(names)), ns.File(rng.randrange(9), 9, 0o600, (777,)), 3)
        elif op < 0.7:
            live = ns.replace(live, ("big", f"file-x{rng.randrange(10**6)}"), ns.File(1, 1, 0o644, ()), 3)
        elif op < 0.9 and ns.get(live, ("big", n := rng.choice(names))) is not None:
            live = ns.replace(live, ("big", n), None, 3)
        else:
            b = ns.must_dir(live, ("big",))
            live = ns.replace(live, ("big",), ns.Dir(b.children, b.mtime + 1, b.mode), 1)
    holder = {dg: data for dg, data, _n in merkle.iter_blocks(snap, V, lambda _d: False)}
    have: dict = {}
    memo = merkle.Decoded() if rng.random() < 0.7 else {}
    while True:
        try:
            tree, used = merkle.assemble(merkle.digest(snap, V), have, [live], V, [], memo)
            break
        except merkle.NeedBlocks as need:
            have.update({d: holder[d] for d in need.digests})
    assert to_dict(tree) == to_dict(snap)
    assert merkle.digest(tree, V) == merkle.digest(snap, V) == tree.digest
    assert tree.stats == merkle.stats(_copy(snap), V) and tree.children["big"].stats == merkle.stats(_copy(big), V)
    tb = tree.children["big"]  # its memoised digest is what encoding it again gives
    assert merkle.digest(ns.Dir(tb.children, tb.mtime, tb.mode), V) == tb.digest == big.digest
    # a replay from the blocks the op would carry, against the same live tree, gives the same
    again, _used = merkle.assemble(merkle.digest(snap, V), {d: have[d] for d in used}, [live], V)
    assert to_dict(again) == to_dict(snap)


def test_a_bad_frame_does_not_spoil_the_next_decompression():
    good = merkle.compress(b"block" * 100)
    for bad in (b"\x28\xb5\x2f\xfd garbage", good[:-3], b""):
        with pytest.raises(CorruptData):
            merkle.decompress(bad)
        assert merkle.decompress(good) == b"block" * 100


def _copy(x):
    """A tree with ``x``'s content, every directory a new node (nothing memoised)."""
    if isinstance(x, ns.File):
        return x
    return ns.Dir(immutables.Map({k: _copy(v) for k, v in x.children.items()}), x.mtime, x.mode)


def _fresh_digest(d):
    """``d``'s digest and counts encoded from scratch."""
    c = _copy(d)
    return merkle.digest(c, V), merkle.stats(c, V)


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_a_changed_big_directory_encodes_only_the_runs_around_its_changes(rng, capped):
    if capped:  # names that never end a run: leaves cut at the cap, a change shifts every later cut
        pool = [n for n in (f"c{i}" for i in range(6000)) if merkle.name_rank(n) < merkle.threshold(0)]
    else:
        pool = [f"n{i}" for i in range(3000)]
    names = rng.sample(pool, rng.randrange(20, min(len(pool), 1300)))
    root = ns.Dir(immutables.Map({"big": ns.Dir(immutables.Map(
        {n: ns.File(1, 1, 0o644, (i,)) for i, n in enumerate(names)}), 1, 0o755)}), 1, 0o755)
    merkle.digest(root, V)
    taken = []
    real = merkle._dir_blocks_from
    try:
        merkle._dir_blocks_from = lambda *a: taken.append(r := real(*a)) or r
        for _round in range(rng.randrange(1, 4)):
            for _ in range(rng.randrange(1, 12)):
                big = ns.must_dir(root, ("big",))
                op = rng.random()
                if op < 0.4 and big.children:
                    n = rng.choice(sorted(big.children))
                    root = ns.replace(root, ("big", n), ns.File(2, rng.randrange(9), 0o644, ()), 7)
                elif op < 0.7 and big.children:
                    root = ns.replace(root, ("big", rng.choice(sorted(big.children))), None, 7)
                else:
                    root = ns.replace(root, ("big", rng.choice(pool)), ns.File(3, 3, 0o644, (5,)), 7)
            assert (merkle.digest(root, V), merkle.stats(root, V)) == _fresh_digest(root)
    finally:
        merkle._dir_blocks_from = real
    if len(ns.must_dir(root, ("big",)).children) > 200 and not capped:
        assert any(r is not None and not r.whole for r in taken)  # the incremental path ran
    for r in taken:  # the leaves it names, in order, as the next change of it takes them
        if r is not None:
            assert list(r.leaves) == merkle._leaves(merkle.block_digest(r.head), r.kids)
            assert merkle._INFOS[merkle.block_digest(r.head)][3] == r.leaves
    big = ns.must_dir(root, ("big",))
    got = merkle._INFOS.get(merkle.digest(big, V))
    if got is not None and got[2]:  # split: its names in order, as its next version starts from them
        assert list(got[5]) == sorted(big.children)


@given(st.lists(st.text(max_size=4), max_size=40, unique=True), st.lists(st.text(max_size=4), max_size=12),
       st.lists(st.text(max_size=4), max_size=12))
def test_names_after_changes_are_the_sorted_names(before, added, removed):
    after = ({n: 1 for n in before} | {n: 1 for n in added})
    for n in removed:
        after.pop(n, None)
    changed = frozenset(added) | frozenset(removed)
    assert merkle.names_after(tuple(sorted(before)), changed, after) == sorted(after)


def test_a_changed_big_directory_takes_its_names_from_its_base(monkeypatch):
    root = ns.Dir(immutables.Map({"big": big_dir(400, random.Random(8))}), 1, 0o755)
    merkle.digest(root, V)
    calls = []
    real = merkle.names_after
    monkeypatch.setattr(merkle, "names_after", lambda *a: calls.append(a[1]) or real(*a))
    name = sorted(ns.must_dir(root, ("big",)).children)[5]
    live = ns.replace(root, ("big", name), ns.File(9, 9, 0o644, (77,)), 2)
    live = ns.replace(live, ("big", "zz-new"), ns.File(1, 1, 0o644, ()), 2)
    assert merkle.digest(live, V) == _fresh_digest(live)[0]
    assert calls == [frozenset({name, "zz-new"})]  # not sorted again from its children


def test_a_split_directory_names_its_leaves_in_order():
    d = big_dir(700, random.Random(3))
    blocks = merkle.dir_blocks(d, V, lambda c: merkle.digest(c, V))
    assert len(blocks.leaves) == len(blocks.lasts) > 1
    assert list(blocks.leaves) == merkle._leaves(merkle.block_digest(blocks.head), blocks.kids)
    for leaf, last in zip(blocks.leaves, blocks.lasts, strict=True):
        assert next(reversed(merkle.decode_block(dict(blocks.parts)[leaf]).entries)) == last
    assert merkle.dir_blocks(big_dir(5, random.Random(3)), V, lambda c: merkle.digest(c, V)).leaves == ()


def test_a_block_naming_sub_blocks_has_every_entry_column_empty():
    parts = bytes(range(64))
    for kind, mode, mtime in ((merkle.KIND_DIR, 0o755, 12), (merkle.KIND_PART, 0, 0)):
        data, info = merkle._entries_block(kind, mode, mtime, [], V, merkle._no_dirs, parts)
        assert unpackb(data) == [merkle.BLOCK_FORMAT, kind, mode, mtime, *[b""] * 9, parts]
        assert info == merkle.BlockInfo((parts[:32], parts[32:]), b"")
        assert merkle.decode_block(data).parts == (parts[:32], parts[32:])


def test_a_derived_directory_keeps_one_older_version_and_forgets_it_once_digested():
    rng = random.Random(2)
    root = ns.Dir(immutables.Map({"big": big_dir(300, rng)}), 1, 0o755)
    merkle.digest(root, V)
    first = ns.must_dir(root, ("big",))
    names = sorted(first.children)
    for n in names[:3]:
        root = ns.replace(root, ("big", n), ns.File(9, 9, 0o644, ()), 9)
    big = ns.must_dir(root, ("big",))
    assert big.base is first and big.changed == frozenset(names[:3]) and root.changed == {"big"}
    blocks = merkle.dir_blocks(big, V, lambda c: merkle.digest(c, V))
    merkle.digest(root, V)
    assert big.base is None and big.changed is None and big.digest == merkle.block_digest(blocks.head)
    for n in names[: ns.MAX_CHANGED + 1]:  # too many changes: encoded whole next time
        root = ns.replace(root, ("big", n), ns.File(8, 8, 0o644, ()), 9)
    assert ns.must_dir(root, ("big",)).base is None


def test_blocks_from_cached_infos_and_leaves_encoded_one_at_a_time(monkeypatch):
    rng = random.Random(4)
    root = ns.Dir(immutables.Map({"big": big_dir(2000, rng)}), 1, 0o755)
    merkle.digest(root, V)
    big = ns.must_dir(root, ("big",))
    full = merkle.dir_blocks(big, V, lambda c: merkle.digest(c, V))
    monkeypatch.setattr(merkle, "_CACHE", {})  # encoded blocks evicted, infos kept
    part = merkle.blocks_of_dir(big, V, whole=False)
    assert not part.whole and part.head == full.head and part.kids == full.kids and part.lasts == full.lasts
    assert set(part.parts) == {(p, b) for p, b in full.parts if p in full.kids}  # the index sub-blocks
    served, asked = {}, set()
    tb = merkle.TreeBlocks(root, V)
    want = [merkle.digest(root, V)]
    while want:  # a walk from the root, as a restore asks
        got = tb.take(want)
        assert set(want) <= set(got)
        served.update(got)
        asked.update(want)
        want = [c for d in want for c in merkle.child_digests(got[d]) if c not in asked]
    assert {p: b for p, b in full.parts} == {p: served[p] for p, _b in full.parts}


# --------------------------------------------------------------------------- changed names (Dir.delta)


def _dirs_of(node):
    stack = [node]
    while stack:
        d = stack.pop()
        if isinstance(d, ns.Dir):
            yield d
            stack.extend(d.children.values())


def _without_hints(fn, *trees):
    """``fn(*trees)`` with every directory's ``delta`` and ``far`` hidden (every name compared),
    then put back."""
    saved = [(d, d.delta, d.far) for t in trees for d in _dirs_of(t)]
    for d, _h, _f in saved:
        d.delta = d.far = None
    try:
        return fn(*trees)
    finally:
        for d, h, f in saved:
            d.delta, d.far = h, f


def _net(added, removed):
    """What a caller of changed_subtrees counts: chunk references and (files, dirs, bytes) in minus out."""
    from collections import Counter

    refs = Counter(h for n in added for h in ns.iter_chunks(n))
    refs.subtract(h for n in removed for h in ns.iter_chunks(n))
    counts = [sum(ns.count(n)[i] for n in added) - sum(ns.count(n)[i] for n in removed) for i in (0, 1, 3)]
    return {h: c for h, c in refs.items() if c}, counts


def test_a_digested_derived_directory_names_what_changed_since_its_base():
    big = big_dir(300, random.Random(3))
    root = ns.Dir(immutables.Map({"big": big}), 1, 0o755)
    merkle.digest(root, V)
    name = sorted(big.children)[7]
    live = ns.replace(root, ("big", name), ns.File(5, 5, 0o644, (99,)), 2)
    assert live.children["big"].base is big  # not digested yet: through its base
    assert ns.changed_names(root.children["big"], live.children["big"]) == {name}
    merkle.digest(live, V)
    assert live.children["big"].base is None and live.children["big"].delta is not None  # through its delta
    assert ns.changed_names(root.children["big"], live.children["big"]) == {name}
    assert ns.changed_names(live.children["big"], root.children["big"]) == {name}
    assert ns.changed_names(big_dir(300, random.Random(4)), live.children["big"]) is None  # another base
    added, removed = ns.changed_subtrees(root, live)
    assert [type(n) for n in added] == [ns.File] and added[0].chunks == (99,) and len(removed) == 1


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 12), st.booleans())
def test_diff_and_changed_subtrees_by_changed_names_are_those_of_every_name(rng, n, between):
    a = build_direct(random_spec(rng))
    merkle.digest(a, V)
    b = mutate(a, rng, n)
    if between:  # a digest pass in between: the next one's base is that version, not ``a``'s
        merkle.digest(b, V)
        b = mutate(b, rng, rng.randrange(0, 4))
    merkle.digest(b, V)
    for x, y in ((a, b), (b, a)):
        assert [c.line() for c in diff_trees(x, y)] == [c.line() for c in _without_hints(diff_trees, x, y)]
        assert _net(*ns.changed_subtrees(x, y)) == _net(*_without_hints(ns.changed_subtrees, x, y))
    from kubegfs import blockdelta

    def older(x, y):  # each newer directory's older counterpart, by the ids of both
        return {k: id(v) for k, v in blockdelta.counterparts(x, y).items()}

    assert older(a, b) == _without_hints(older, a, b)


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 12), st.booleans())
def test_a_holder_walk_asks_only_about_changed_children_and_finds_every_block_it_lacks(rng, n, between):
    """Below a directory known to be another plus a few changed names whose block the holder
    has, only those names' subdirectories are visited; the blocks found are exactly those of
    the tree the holder lacks, children before parents, as a walk over every name finds."""
    a = build_direct(random_spec(rng))
    merkle.digest(a, V)
    holder = {dg for dg, _b, _n in merkle.iter_blocks(a, V, lambda _d: False)}
    b = mutate(a, rng, n)
    if between:  # a version the holder never got in between
        merkle.digest(b, V)
        b = mutate(b, rng, rng.randrange(0, 4))
    merkle.digest(b, V)
    _walk_finds_what_every_name_finds(b, holder)


def _walk_finds_what_every_name_finds(b, holder):
    """The walk for what ``holder`` lacks below ``b`` finds exactly the blocks a walk over every
    name finds, children before parents, with at most two questions more (the anchors, see
    Dir.delta and Dir.far) per block it finds; the commit's infos of the blocks the catalog
    lacks are the same blocks."""
    asked: list[bytes] = []

    def ask(d):
        asked.append(d)
        return d in holder

    got = [(dg, blk) for dg, blk, _n in merkle.iter_blocks(b, V, ask)]
    every = {dg: blk for dg, blk, _n in merkle.iter_blocks(b, V, lambda _d: False)}
    assert dict(got) == {dg: blk for dg, blk in every.items() if dg not in holder}
    assert sorted(got) == sorted(_without_hints(lambda t: list(
        (dg, blk) for dg, blk, _n in merkle.iter_blocks(t, V, holder.__contains__)), b))
    order = {dg: i for i, (dg, _blk) in enumerate(got)}
    for dg, blk in got:  # children before parents
        assert all(order[c] < order[dg] for c in merkle.child_digests(blk) if c in order)
    every_asked: list[bytes] = []
    _without_hints(lambda t: list(merkle.iter_blocks(t, V, lambda d: every_asked.append(d) or d in holder)), b)
    assert len(asked) <= len(every_asked) + 2 * len(got)
    infos = merkle.new_block_infos(b, V, holder.__contains__)
    assert set(infos) == {dg for dg, _blk in got}
    assert infos == _without_hints(lambda t: merkle.new_block_infos(t, V, holder.__contains__), b)


def test_a_holder_walk_and_the_commits_infos_do_not_ask_about_the_unchanged_siblings_of_a_change():
    root = build_direct({".": (0o755, 1), **{f"d{i}": {".": (0o755, 1), "f": ("f", i, 1, 0o644, (i,))}
                                             for i in range(12)}})
    merkle.digest(root, V)
    holder = {dg for dg, _b, _n in merkle.iter_blocks(root, V, lambda _d: False)}
    live = ns.replace(root, ("d3", "f"), ns.File(9, 2, 0o644, (99,)), 2)
    merkle.digest(live, V)
    asked: list[bytes] = []
    got = [n for _dg, _b, n in merkle.iter_blocks(live, V, lambda d: asked.append(d) or d in holder)]
    assert got == [live.children["d3"], live]
    siblings = {merkle.digest(k, V) for name, k in live.children.items() if name != "d3"}
    assert not siblings & set(asked)  # the root's base is held: only d3 below it is visited
    asked.clear()
    infos = merkle.new_block_infos(live, V, lambda d: asked.append(d) or d in holder)
    assert set(infos) == {merkle.digest(live, V), merkle.digest(live.children["d3"], V)}
    assert not siblings & set(asked)


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 4), st.booleans())
def test_a_walk_from_the_version_a_holder_got_finds_every_block_it_lacks_across_digests_ahead(rng, passes, ship_between):
    """Versions digested ahead between two snapshots (no holder has their blocks): each
    directory keeps its changes since the version the last build shipped (``Dir.far``), the
    walk for what a holder of that snapshot lacks visits only those names, and finds exactly
    the blocks a walk over every name finds, children before parents."""
    a = build_direct(random_spec(rng))
    merkle.digest(a, V)
    holder = {dg for dg, _b, _n in merkle.iter_blocks(a, V, lambda _d: False)}
    merkle.mark_shipped(_dirs_of(a))
    b = a
    for i in range(passes):  # digest passes ahead of the snapshot
        b = mutate(b, rng, rng.randrange(0, 5))
        merkle.digest(b, V)
        if ship_between and i == 0:  # a snapshot shipped in between: the anchor moves to it
            got = list(merkle.iter_blocks(b, V, holder.__contains__))
            holder.update(dg for dg, _b, _n in got)
            merkle.mark_shipped(d for dg, _b, d in got if dg == d.digest)
    _walk_finds_what_every_name_finds(b, holder)


def test_a_walk_after_a_digest_ahead_does_not_ask_about_the_unchanged_siblings_of_a_change():
    root = build_direct({".": (0o755, 1), **{f"d{i}": {".": (0o755, 1), "f": ("f", i, 1, 0o644, (i,))}
                                             for i in range(12)}})
    merkle.digest(root, V)
    holder = {dg for dg, _b, _n in merkle.iter_blocks(root, V, lambda _d: False)}
    merkle.mark_shipped(_dirs_of(root))
    live = ns.replace(root, ("d3", "f"), ns.File(9, 2, 0o644, (99,)), 2)
    merkle.digest(live, V)  # a pass ahead: the next version's base is this one, which no holder has
    live = ns.replace(live, ("d5", "f"), ns.File(9, 2, 0o644, (98,)), 3)
    merkle.digest(live, V)
    assert live.delta[0] not in holder and live.far == (merkle.digest(root, V), frozenset({"d3", "d5"}))
    asked: list[bytes] = []
    got = [n for _dg, _b, n in merkle.iter_blocks(live, V, lambda d: asked.append(d) or d in holder)]
    assert got == [live.children["d5"], live.children["d3"], live] or got == [live.children["d3"], live.children["d5"], live]
    siblings = {merkle.digest(k, V) for name, k in live.children.items() if name not in ("d3", "d5")}
    assert not siblings & set(asked)
    merkle.mark_shipped(got)  # shipped: the next version's anchor is this one
    nxt = ns.replace(live, ("d7", "f"), ns.File(9, 2, 0o644, (97,)), 4)
    merkle.digest(nxt, V)
    assert nxt.far == nxt.delta == (merkle.digest(live, V), frozenset({"d7"}))


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_a_restored_directory_names_what_it_changed_in_the_live_one(rng):
    big = big_dir(rng.randrange(40, 400), rng)
    snap = ns.Dir(immutables.Map({"big": big}), 1, 0o755)
    merkle.digest(snap, V)
    live = snap
    names = sorted(big.children)
    for _ in range(rng.randrange(1, 6)):
        if rng.random() < 0.6:
            live = ns.replace(live, ("big", rng.choice(names)), ns.File(rng.randrange(9), 9, 0o600, (777,)), 3)
        else:
            live = ns.replace(live, ("big", f"file-x{rng.randrange(10**6)}"), ns.File(1, 1, 0o644, (778,)), 3)
    holder = {dg: data for dg, data, _n in merkle.iter_blocks(snap, V, lambda _d: False)}
    tree = assemble_fetching(merkle.digest(snap, V), holder, [live], V)
    tb, lb = tree.children["big"], live.children["big"]
    split = bool(merkle.decode_block(holder[big.digest]).parts)
    assert (tb.delta is not None) == (split and lb is not big)  # an edit of the live one, when split
    if tb.delta is not None:
        assert tb.delta[0] == merkle.digest(lb, V)
        assert ns.changed_names(lb, tb) is not None and len(ns.changed_names(lb, tb)) < len(tb.children)
    assert _net(*ns.changed_subtrees(live, tree)) == _net(*_without_hints(ns.changed_subtrees, live, tree))
    assert to_dict(tree) == to_dict(snap)


def test_a_restore_job_takes_the_blocks_a_tree_in_memory_gives_and_asks_only_for_the_rest():
    from kubegfs.master.snapshots import _assemble_job

    rng = random.Random(5)
    snap = ns.Dir(immutables.Map({"big": big_dir(200, rng), "d": build_direct(random_spec(rng))}), 1, 0o755)
    root = merkle.digest(snap, V)
    live = ns.replace(snap, ("big", sorted(snap.children["big"].children)[0]), ns.File(1, 2, 0o644, (5,)), 3)
    have: dict = {}
    tree, used, handles = _assemble_job(root, have, [live], V, [], merkle.Decoded(), merkle.TreeBlocks(snap, V))
    assert to_dict(tree) == to_dict(snap) and set(used) <= set(have)
    assert sorted(handles) == sorted(h for dg in used for h in merkle.block_chunks(have[dg]))
    other = ns.Dir(immutables.Map({"x": big_dir(30, rng)}), 1, 0o755)  # gives none of them
    with pytest.raises(merkle.NeedBlocks) as need:
        _assemble_job(root, {}, [live], V, [], merkle.Decoded(), merkle.TreeBlocks(other, V))
    assert need.value.digests == [root]


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 12), st.booleans(), st.booleans())
def test_edits_from_a_live_tree_to_a_snapshot_give_the_snapshot(rng, n, between, hints):
    from kubegfs.formats import packb, unpackb

    snap = build_direct(random_spec(rng))
    merkle.digest(snap, V)  # as a snapshot's build does
    live = mutate(snap, rng, n)
    if between:
        merkle.digest(live, V)  # a digest pass in between (a diff against the live tree)
        live = mutate(live, rng, rng.randrange(0, 4))
    edits = ns.edits_to(live, snap) if hints else _without_hints(ns.edits_to, live, snap)
    missing = any(not isinstance(ns.get(live, p), ns.Dir) for p, x in ns.walk(snap) if isinstance(x, ns.Dir))
    if edits is None:  # only when a directory of the snapshot is not one in the live tree
        assert missing
        return
    got = ns.apply_edits(live, unpackb(packb(edits)))
    assert to_dict(got) == to_dict(snap)
    if not n and not between:
        assert edits == []
    for parts, node in ns.walk(got):  # what no edit names is the live tree's own node
        if not any(e[1][:len(parts)] == list(parts) for e in edits) and parts:
            assert ns.get(live, parts) is node


def test_bad_restore_edits_are_refused():
    live = build_direct({".": (0o755, 1), "f": ("f", 1, 1, 0o644, (1,))})
    for bad in (["q", []], ["f", ["f", "x"], 1, 1, 0o644, []], ["x", []], ["d", ["a"], "m", 1], ["f", "f"]):
        with pytest.raises(Exception) as exc:
            ns.apply_edits(live, [bad])
        assert type(exc.value).__name__ == "InvalidArgument"


def test_too_many_edits_go_by_blocks(monkeypatch):
    snap = build_direct({".": (0o755, 1), **{f"f{i}": ("f", i, 1, 0o644, (i + 1,)) for i in range(5)}})
    merkle.digest(snap, V)
    live = snap
    for i in range(3):
        live = ns.replace(live, (f"f{i}",), None, 2)
    assert len(ns.edits_to(live, snap)) == 4  # three files back, the directory's mtime
    monkeypatch.setattr(ns, "MAX_EDITS", 3)
    assert ns.edits_to(live, snap) is None


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_leaves_encoded_together_are_those_encoded_one_by_one(rng):
    kids = {}
    dirs = rng.choice((0.0, 0.2))  # a directory of files alone takes a path of its own
    for i in range(rng.randrange(1, 300)):
        if rng.random() < dirs:
            kids[f"d{i}"] = ns.Dir(immutables.Map({"x": ns.File(1, 1, 0o644, (i,))}), 2, 0o700)
        else:
            kids[f"f{i}"] = ns.File(rng.randrange(1 << 40), rng.randrange(1 << 60), 0o600,
                                    tuple(rng.randrange(1 << 50) for _ in range(rng.choice((0, 1, 1, 3)))))
    names = sorted(kids)
    items = [(n, kids[n]) for n in names]
    ends = merkle.runs(merkle._ranks(names), 0)
    child = lambda c: merkle.digest(c, V)  # noqa: E731
    one_by_one = [merkle._entries_block(merkle.KIND_PART, 0, 0, items[a:b], V, child)
                  for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    raw = [n.encode("utf-8") for n in names]
    blocks, counts = merkle._leaf_blocks(raw, [k for _n, k in items], ends, V, child)
    assert blocks == one_by_one
    assert counts == merkle._sum_stats(ns.Dir(immutables.Map(kids), 1, 0o755))  # the counts from the same columns


def test_a_walk_takes_leaves_at_hand_instead_of_encoding_a_directory_again(monkeypatch):
    rng = random.Random(21)
    old = ns.Dir(immutables.Map({"big": big_dir(300, rng)}), 1, 0o755)
    merkle.digest(old, V)
    holder = {dg for dg, _b, _d in merkle.iter_blocks(old, V, lambda _d: False)}
    names = sorted(ns.must_dir(old, ("big",)).children)

    def write(root, name, t):
        f = ns.must_get(root, ("big", name))
        return ns.replace(root, ("big", name), ns.File(f.size + 1, t, f.mode, (rng.randrange(1 << 40),)), t)

    v1 = write(old, names[10], 7)
    merkle.digest(v1, V)
    at_hand = {dg: b for dg, b, _d in merkle.iter_blocks(v1, V, holder.__contains__)}
    v2 = write(v1, names[250], 8)  # another leaf: v2's own encoding holds only that one anew
    merkle.digest(v2, V)
    encoded = []
    real = merkle.dir_blocks
    monkeypatch.setattr(merkle, "dir_blocks", lambda *a: encoded.append(1) or real(*a))
    got = list(merkle.iter_blocks(v2, V, holder.__contains__, None, at_hand))
    assert not encoded
    want = list(merkle.iter_blocks(v2, V, holder.__contains__))  # (encodes "big" whole)
    assert encoded
    assert sorted(g[:2] for g in got) == sorted(w[:2] for w in want)
    seen: set[bytes] = set()
    wanted = {w[0] for w in want}
    for dg, b, _d in got:  # children before parents
        assert all(c in seen for c in merkle.child_digests(b) if c in wanted)
        seen.add(dg)
    assert any(dg in at_hand for dg, _b, _d in got)  # the leaf v1 changed, v2 not


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from([0x12345678, 0x0, 0xFFFFFFFF])),
                max_size=1500))
def test_leaf_ends_cut_where_runs_cuts_by_ranks(crcs):
    # the sampled values rank below a leaf's threshold (0x0 above it): long runs hit MAX_RUN
    assert merkle.leaf_ends(crcs) == merkle.runs([merkle._rank(c) for c in crcs], 0)


def test_ranks_are_those_of_each_name_alone():
    names = ["", "a", "é", "x" * 300, "part-00001.parquet", "\u4e2d\u6587"]
    assert merkle._ranks(names) == [merkle.name_rank(n) for n in names]
    assert merkle._ranks(names) == [32 - ((zlib.crc32(n.encode()) * 0x9E3779B1) & 0xFFFFFFFF).bit_length()
                                    for n in names]
    assert merkle._encoded(["a", "b\x00c"]) == [b"a", b"b\x00c"]  # a NUL in a name: one by one
    assert merkle._encoded([]) == []


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=40), st.sampled_from([merkle.ZSTD_LEVEL, -1, 3]))
def test_blocks_compressed_in_one_call_are_those_compressed_one_by_one(blocks, level):
    got = merkle.compress_many(blocks, level)
    assert got == [merkle.compress(b, level) for b in blocks]
    assert [merkle.decompress(z) for z in got] == blocks

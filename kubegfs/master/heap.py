"""The C heap under Python's: give the pages a big transient job freed back to the kernel."""

from __future__ import annotations

import ctypes


def trim_heap() -> bool:
    """``malloc_trim(0)`` (glibc): return every free page of the heap, not only its top. Loading
    a checkpoint frees the decoder's columns, lists and tables, but glibc keeps the pages of a
    free block that live objects sit above, so they stayed in the master's RSS for good (1M
    files: a third of it, by measurement; in process, 100k files: 67.9 -> 42.6 MiB). Costs a
    walk of the heap's free lists, once. ``False`` where this is not glibc or nothing went back."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return bool(fn(0))


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
BIG_BLOCK = 1 << 20  # a block this big or bigger is mapped on its own (the master's are transient)


def map_big_blocks() -> bool:
    """Serve every allocation of BIG_BLOCK or more with its own mapping, given back whole when
    freed. glibc's default raises that threshold to the size of each big block freed (up to 32
    MiB) and serves smaller big ones from the heap: a checkpoint read for a metadata copy (17 MiB
    at 1M files), a batch of blocks, a column of the decoder. Freed, those stayed in RSS wherever
    a live object sat above them: the same master measured 413 or 506 MiB per million files
    depending on what had run before the sample. The master's big blocks are transient and few,
    so a fresh mapping each time costs little (unlike a chunkserver's piece buffers, see
    ``keep_heap``). ``False`` where this is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, BIG_BLOCK))

"""The C heap under Python's (glibc): the master gives the pages of big transient jobs back to
the kernel; a chunkserver keeps them for its next piece buffers. ``False`` from each where this
is not glibc."""

from __future__ import annotations

import ctypes
from typing import Any


def trim_heap() -> bool:
    """``malloc_trim(0)`` (glibc): return every free page of the heap, not only its top. Loading
    a checkpoint frees the decoder's columns, lists and tables, but glibc keeps the pages of a
    free block that live objects sit above, so they stayed in the master's RSS for good (1M
    files: a third of it, by measurement; in process, 100k files: 67.9 -> 42.6 MiB). Costs a
    walk of the heap's free lists, once. ``False`` where this is not glibc or nothing went back."""
    fn = _libc("malloc_trim", ctypes.c_size_t)
    return fn is not None and bool(fn(0))


def _libc(name: str, *argtypes: Any) -> Any:
    """A C library function of this process, or None where it has none by that name."""
    try:
        fn = ctypes.CDLL(None)[name]
    except (AttributeError, OSError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _mallopt(*settings: tuple[int, int]) -> bool:
    mallopt = _libc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and all(bool(mallopt(param, value)) for param, value in settings)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
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
    return _mallopt((M_MMAP_THRESHOLD, BIG_BLOCK))


def keep_heap(keep: int = 256 << 20) -> bool:
    """Keep freed memory in this process's heap, so a chunkserver's 8 MiB piece buffers reuse
    pages that are mapped already: by default glibc gives a large free block back to the kernel
    (the heap's top trimmed with ``brk``, a large block unmapped) and takes fresh pages for the
    next piece, whose first touches (page faults, zeroing, on a VM the host's faults too) showed
    as ~20% of a chunkserver's CPU serving reads. What the heap keeps is bounded by the peak use."""
    return _mallopt((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, keep))

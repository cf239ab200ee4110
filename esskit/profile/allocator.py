"""A model of PyTorch's CUDA caching allocator (default settings), for the profiler's estimate.

`max_memory_reserved` is what a memory cap limits, and it exceeds the live bytes by the
allocator's fragmentation: blocks are carved out of cudaMalloc'ed segments, freed blocks stay
cached in their segment, and a request that no cached block fits opens a new segment. On an
H200 capped at 12 GiB the measured reserved memory was 3-17 % above the allocated memory at the
max batch (profiling/README.md). This model replays the step's allocations and frees in order
with the allocator's rules from c10/cuda/CUDACachingAllocator.cpp:

- sizes round up to 512 bytes; requests up to 1 MiB use the small pool, larger ones the large pool;
- a request takes the smallest cached block of its pool that fits (ties: lowest address) and
  splits off the rest when at least 512 bytes (small pool) or more than 1 MiB (large pool) remain;
- with no such block, a new segment: 2 MiB for the small pool, 20 MiB for requests under 10 MiB,
  else the request rounded up to 2 MiB;
- when a segment would exceed the cap, every fully free cached segment is released first
  (`empty_cache`), and only then is the request out of memory;
- a freed block merges with free neighbours in its segment.

Not modelled: streams (one here), expandable segments, `max_split_size_mb`, and the memory that
cuDNN and cuBLAS allocate for their workspaces (not visible to fake tensors).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

MB = 1024**2
MIN_BLOCK = 512
SMALL_SIZE = 1 * MB  # largest request of the small pool
SMALL_SEGMENT = 2 * MB
LARGE_SEGMENT = 20 * MB  # segment for large-pool requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MB
ROUND_LARGE = 2 * MB


class SimulatedOutOfMemory(Exception):
    pass


def block_bytes(nbytes: int) -> int:
    """Bytes the allocator hands out for a request of `nbytes` (what `max_memory_allocated` counts
    before splitting rules; empty storages take no block)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK) if nbytes else 0


@dataclass(eq=False)
class Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    def key(self) -> tuple[int, int, int, int]:
        return self.size, self.segment, self.offset, id(self)


class CachingAllocatorModel:
    """Replays malloc/free; `reserved` (segments) and `allocated` bytes, with their peaks."""

    def __init__(self, cap: int | None = None):
        self.cap = cap
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0
        self._free: dict[bool, list] = {True: [], False: []}  # small pool?, sorted (size, addr..., id)
        self._blocks: dict[int, Block] = {}  # id -> block, for the free lists' keys
        self._segments: dict[int, Block] = {}  # segment -> its first block
        self._next_segment = 0

    def malloc(self, nbytes: int) -> Block:
        size = block_bytes(nbytes)
        small = size <= SMALL_SIZE
        block = self._take_cached(size, small) or self._new_segment(size, small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = Block(block.segment, block.offset + size, remaining, small, prev=block, next=block.next)
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._cache(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        block.free = True
        self.allocated -= block.size
        for neighbour in (block.next, block.prev):
            if neighbour is not None and neighbour.free:
                self._uncache(neighbour)
                first, second = (block, neighbour) if neighbour is block.next else (neighbour, block)
                first.size += second.size
                first.next = second.next
                if second.next:
                    second.next.prev = first
                block = first
        self._cache(block)

    def _take_cached(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        i = bisect_left(pool, (size, -1, -1, -1))
        if i == len(pool):
            return None
        block = self._blocks.pop(pool.pop(i)[3])
        return block

    def _new_segment(self, size: int, small: bool) -> Block:
        if small:
            segment = SMALL_SEGMENT
        else:
            segment = LARGE_SEGMENT if size < MIN_LARGE_ALLOC else -(-size // ROUND_LARGE) * ROUND_LARGE
        if self.cap is not None and self.reserved + segment > self.cap:
            self.empty_cache()
            if self.reserved + segment > self.cap:
                raise SimulatedOutOfMemory(f"{segment} bytes more would exceed the {self.cap}-byte cap")
        self.reserved += segment
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = Block(self._next_segment, 0, segment, small)
        self._segments[self._next_segment] = block
        self._next_segment += 1
        return block

    def empty_cache(self) -> None:
        """Release every segment that is one free block (what the allocator does before an OOM)."""
        for segment, first in list(self._segments.items()):
            if first.free and first.next is None:
                self._uncache(first)
                del self._segments[segment]
                self.reserved -= first.size

    def _cache(self, block: Block) -> None:
        self._blocks[id(block)] = block
        insort(self._free[block.small], block.key())

    def _uncache(self, block: Block) -> None:
        pool = self._free[block.small]
        del pool[bisect_left(pool, block.key())]
        del self._blocks[id(block)]

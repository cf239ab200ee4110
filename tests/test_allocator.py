"""esskit.profile.allocator: the caching-allocator model's rules, each on a hand-computed case."""

import pytest

from esskit.profile.allocator import CachingAllocatorModel, SimulatedOutOfMemory

MB = 2**20


def test_small_requests_share_a_2_mib_segment():
    model = CachingAllocatorModel()
    a, b = model.malloc(100), model.malloc(700_000)
    assert (a.size, b.size) == (512, 700_416)  # rounded up to 512 bytes
    assert model.reserved == 2 * MB and a.segment == b.segment


def test_large_requests_under_10_mib_open_20_mib_segments_and_split_them():
    model = CachingAllocatorModel()
    a = model.malloc(3 * MB)
    b = model.malloc(5 * MB)  # from a's segment's cached remainder (17 MiB)
    assert model.reserved == 20 * MB and b.segment == a.segment and b.offset == 3 * MB
    assert model.malloc(11 * MB).segment == a.segment  # the last 12 MiB of it
    c = model.malloc(13 * MB + 1)  # 10 MiB and up: a segment of the request rounded up to 2 MiB
    assert model.reserved == 20 * MB + 14 * MB and c.size == 14 * MB  # < 1 MiB left: not split


def test_large_pool_keeps_remainders_of_1_mib_or_less_in_the_block():
    model = CachingAllocatorModel()
    model.free(model.malloc(12 * MB))  # a 12 MiB segment, now cached
    reused = model.malloc(11 * MB + 512 * 1024)  # 0.5 MiB would remain: not split
    assert reused.size == 12 * MB and model.allocated == 12 * MB and model.reserved == 12 * MB


def test_best_fit_takes_the_smallest_cached_block_that_fits():
    model = CachingAllocatorModel()
    big, small = model.malloc(16 * MB), model.malloc(12 * MB)  # two segments
    model.free(big)
    model.free(small)
    assert model.malloc(11 * MB).segment == small.segment  # 12 MiB block, not the 16 MiB one


def test_freed_neighbours_merge_back_into_one_block():
    model = CachingAllocatorModel()
    a, b, c = model.malloc(4 * MB), model.malloc(4 * MB), model.malloc(4 * MB)  # one 20 MiB segment
    model.free(a)
    model.free(c)  # merges with the 8 MiB tail
    model.free(b)  # merges with both
    whole = model.malloc(20 * MB)
    assert whole.segment == a.segment and whole.offset == 0 and model.reserved == 20 * MB


def test_fragmentation_opens_a_segment_while_enough_bytes_are_free():
    model = CachingAllocatorModel()
    blocks = [model.malloc(12 * MB) for _ in range(3)]  # three 12 MiB segments
    model.free(blocks[0])
    model.free(blocks[2])  # 24 MiB free, in two segments
    model.malloc(14 * MB)
    assert model.reserved == 50 * MB and model.allocated == 26 * MB and model.peak_reserved == 50 * MB


def test_the_cap_releases_cached_segments_before_running_out():
    model = CachingAllocatorModel(cap=32 * MB)
    model.free(model.malloc(20 * MB))  # cached 20 MiB segment
    model.malloc(22 * MB)  # 20 + 22 > 32: the free segment is released first, then it fits
    assert model.reserved == 22 * MB and model.peak_reserved == 22 * MB
    with pytest.raises(SimulatedOutOfMemory):
        model.malloc(12 * MB)  # 22 live + 12 > 32, nothing left to release

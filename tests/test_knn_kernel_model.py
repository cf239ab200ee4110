"""profiling/knn_kernel_model.py: its shortcut for the merge rounds equals the kernel's own loop
(replayed in numpy), and it reads a tile and a round out of the kernel's sm_90a build."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profiling"))  # as when the script runs
import knn_kernel_model as model  # noqa: E402


def _kernel_rounds(dist: np.ndarray, k: int, block_n: int, block_c: int) -> int:
    """The rounds of `_knn_kernel`'s `while pending` loop, step by step: each round moves every
    pending row's tile minimum into the slot of its worst, until no row's minimum beats its worst."""
    rounds = 0
    for r0 in range(0, dist.shape[0], block_n):
        best = np.full((block_n, k), np.inf)
        for c0 in range(0, dist.shape[1], block_c):
            tile = dist[r0:r0 + block_n, c0:c0 + block_c].copy()
            while True:
                low, worst = tile.min(1), best.max(1)
                pending = low < worst
                if not pending.any():
                    break
                rounds += 1
                rows = np.nonzero(pending)[0]
                best[rows, best[rows].argmax(1)] = low[rows]
                tile[rows, tile[rows].argmin(1)] = np.inf
    return rounds


@pytest.mark.parametrize("classes,block_n,block_c,k", [(150, 32, 32, 7), (300, 16, 16, 9), (70, 64, 16, 5)])
def test_round_count_matches_the_kernels_loop(classes, block_n, block_c, k):
    queries = 256
    dist = model.random_distances(classes, 12, queries, seed=3)
    tiles, rounds = model.rounds_per_query(dist, block_n, block_c, k)
    assert tiles == -(-classes // block_c) / block_n
    assert rounds * queries == _kernel_rounds(dist, k, block_n, block_c)


def test_build_reads_a_tile_and_a_round_from_the_sass():
    pytest.importorskip("triton")
    try:
        row = model.build("32x32x4", 1284, 12, 7)
    except (RuntimeError, FileNotFoundError) as error:  # a Triton without the NVIDIA tools
        pytest.skip(f"no CUDA toolchain in this Triton: {error}")
    assert row["registers"] > 0 and row["spill_bytes"] >= 0
    # a round (the inner loop) is a few hundred instructions and a tile holds the distances' FMAs
    assert 100 < row["round_instructions"] < row["tile_instructions"] + 200 and row["tile_instructions"] > 128

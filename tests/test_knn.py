"""esskit.knn against a brute-force cdist + full sort reference."""

import pytest
import torch

from esskit.errors import ConfigError
from esskit.knn import knn_backend, knn_exact, knn_faiss


def _data(n=300, c=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(c, d, generator=g, dtype=torch.float64))


def _reference(queries, keys, k):
    """Float64 squared distances, fully sorted."""
    dist = torch.cdist(queries.double(), keys.double()) ** 2
    order = dist.argsort(dim=1)
    return dist.gather(1, order)[:, :k], order[:, :k], dist


def _assert_matches_reference(dist, idx, queries, keys, k, gap=1e-4):
    ref_dist, ref_idx, full = _reference(queries, keys, k)
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert idx.dtype == torch.int64
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    # The returned distances are those of the returned indices.
    torch.testing.assert_close(full.gather(1, idx), ref_dist, rtol=1e-5, atol=1e-5)
    # Indices must agree wherever the k-th neighbour is separated from its neighbours in the order
    # (fp32 search vs fp64 reference may only swap near-ties).
    sorted_all = full.sort(dim=1).values
    gaps = sorted_all[:, 1:] - sorted_all[:, :-1]
    lo = torch.cat([torch.full_like(gaps[:, :1], float("inf")), gaps], 1)[:, :k]
    hi = torch.cat([gaps, torch.full_like(gaps[:, :1], float("inf"))], 1)[:, :k]
    distinct = (lo > gap) & (hi > gap)
    assert distinct.float().mean() > 0.95, "test data has too many near-ties"
    assert torch.equal(idx[distinct], ref_idx[distinct])


@pytest.mark.parametrize("k", [1, 5, 37])
def test_knn_exact_equals_bruteforce(k):
    q, keys = _data()
    dist, idx = knn_exact(q, keys, k)
    _assert_matches_reference(dist, idx, q, keys, k)
    # ascending
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_k_equals_c_is_a_permutation_of_all_classes():
    q, keys = _data(n=50, c=11)
    _, idx = knn_exact(q, keys, 11)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(11).expand(50, 11))


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 37 * 7, 4 * 37 * 300, 2**30])
def test_chunk_sizes_give_identical_results(chunk_bytes):
    # 1 byte -> 1 row per block; 7 rows per block does not divide 300; 300 rows = exactly one
    # block; 1 GiB -> one block bigger than the input.
    q, keys = _data()
    dist_ref, idx_ref = knn_exact(q, keys, 6, chunk_bytes=4 * 37 * 13)
    dist, idx = knn_exact(q, keys, 6, chunk_bytes=chunk_bytes)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(dist, dist_ref, rtol=1e-6, atol=1e-6)
    _assert_matches_reference(dist, idx, q, keys, 6)


def test_chunk_boundary_rows_are_not_dropped_or_duplicated():
    # 10 queries, blocks of 3 rows: rows 9 sits alone in the last block.
    keys = torch.eye(10, dtype=torch.float64) * 10
    q = keys + 0.01 * torch.arange(10, dtype=torch.float64)[:, None]
    _, idx = knn_exact(q, keys, 1, chunk_bytes=4 * 10 * 3)
    assert torch.equal(idx[:, 0], torch.arange(10))


@pytest.mark.parametrize("k", [0, -1, 38])
def test_bad_k_raises_config_error(k):
    q, keys = _data()
    with pytest.raises(ConfigError, match="k"):
        knn_exact(q, keys, k)
    with pytest.raises(ConfigError):
        knn_faiss(q, keys, k)


def test_empty_queries():
    _, keys = _data()
    dist, idx = knn_exact(torch.zeros(0, 8, dtype=torch.float64), keys, 3)
    assert dist.shape == (0, 3) and idx.shape == (0, 3)
    assert idx.dtype == torch.int64


def test_faiss_matches_exact():
    pytest.importorskip("faiss")
    q, keys = _data(n=500, c=64, d=12, seed=1)
    dist_f, idx_f = knn_faiss(q, keys, 9)
    dist_e, idx_e = knn_exact(q, keys, 9)
    _assert_matches_reference(dist_f, idx_f, q, keys, 9)
    ref_dist, _, full = _reference(q, keys, 9)
    distinct_rows = ((full.sort(1).values[:, 1:11].diff(dim=1)).abs() > 1e-4).all(1)
    assert torch.equal(idx_f[distinct_rows], idx_e[distinct_rows])
    torch.testing.assert_close(dist_f.double(), dist_e.double(), rtol=1e-5, atol=1e-5)
    assert knn_backend("faiss") is knn_faiss
    d_t, i_t = knn_backend("torch", chunk_bytes=64)(q, keys, 9)
    assert torch.equal(i_t, idx_e)


def test_grad_requiring_inputs_produce_no_grad():
    q, keys = _data()
    q.requires_grad_(True)
    keys.requires_grad_(True)
    for fn in (knn_exact, knn_faiss):
        dist, idx = fn(q, keys, 4)
        assert not dist.requires_grad and dist.grad_fn is None
        assert not idx.requires_grad
    assert q.grad is None and keys.grad is None


def test_knn_exact_is_exact_under_autocast():
    # The losses run "in fp32, also under autocast" and the search is documented as exact: a
    # bf16 autocast region must not change which neighbours are found.
    q, keys = _data(n=2000, c=300, d=12, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist, idx = knn_exact(q.float(), keys.float(), 8)
    assert dist.dtype == torch.float32
    _assert_matches_reference(dist, idx, q, keys, 8)

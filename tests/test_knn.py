"""esskit.knn against a brute-force cdist + full sort reference."""

import pytest
import torch

from esskit.errors import ConfigError
from esskit.knn import (_first_tap, bilinear_taps, block_neighbours, bounded_neighbours, covering_cells,
                        feature_neighbours, knn_backend, knn_exact, knn_faiss)


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


def test_distances_are_clamped_at_zero_where_rounding_cancels():
    # |q|^2 - 2 q.k + |k|^2 cancels to a rounding error for q = k (Eq. 7's search of the classes
    # against themselves); |q|^2 joins after the k-selection, the clamp must still apply to it.
    keys = torch.randn(64, 12, generator=torch.Generator().manual_seed(3)) * 30
    dist, idx = knn_exact(keys, keys, 2, chunk_bytes=4 * 64 * 5)
    assert (dist >= 0).all()
    assert torch.equal(idx[:, 0], torch.arange(64))
    assert dist[:, 0].abs().max() < 1e-2 < dist[:, 1].min()


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


# Shared neighbour lists (method.knn_at = "feature", method.knn_block = 2 | 4)

def _bruteforce_lists(queries, keys, k):
    """[M, d] queries (normalised here) -> their k nearest keys by a full float64 sort."""
    q = queries / queries.norm(dim=1, keepdim=True)
    return (torch.cdist(q.double(), keys.double()) ** 2).argsort(dim=1)[:, :k]


def _all_lookups(neighbours, n, rows=7):
    """Every label pixel's list, looked up in uneven chunks (7 rows) to cross chunk boundaries."""
    return torch.cat([neighbours.lookup(s, min(s + rows, n)) for s in range(0, n, rows)])


@pytest.mark.parametrize("label, grid", [(512, 128), (450, 113), (7, 3), (5, 5)])
def test_covering_cells_is_nearest_exact_interpolation(label, grid):
    index_map = torch.arange(grid, dtype=torch.float64).view(1, 1, grid, 1)
    expected = torch.nn.functional.interpolate(index_map, size=(label, 1), mode="nearest-exact").view(-1).long()
    assert torch.equal(covering_cells(label, grid), expected)


def test_feature_neighbours_share_the_covering_feature_pixels_list():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 5, 6, generator=g, dtype=torch.float64)
    keys = torch.nn.functional.normalize(torch.randn(30, 6, generator=g, dtype=torch.float64), dim=1)
    shared = feature_neighbours(features, (18, 23), keys, 5)
    # reference: each label pixel's covering feature pixel, found by nearest-exact upsampling
    owner = torch.arange(2 * 5 * 6, dtype=torch.float64).view(2, 1, 5, 6)
    owner = torch.nn.functional.interpolate(owner, size=(18, 23), mode="nearest-exact").reshape(-1).long()
    lists = _bruteforce_lists(features.permute(0, 2, 3, 1).reshape(-1, 6), keys, 5)
    assert torch.equal(_all_lookups(shared, 2 * 18 * 23), lists[owner])


@pytest.mark.parametrize("block", [2, 4])
def test_block_neighbours_search_the_mean_direction_of_each_block(block):
    g = torch.Generator().manual_seed(block)
    emb = torch.randn(2, 5, 9, 10, generator=g, dtype=torch.float64)  # 9 x 10: partial border blocks
    keys = torch.nn.functional.normalize(torch.randn(25, 5, generator=g, dtype=torch.float64), dim=1)
    shared = block_neighbours(emb, block, keys, 4)
    unit = emb / emb.norm(dim=1, keepdim=True)
    expected = []
    for b in range(2):
        for y in range(9):
            for x in range(10):
                y0, x0 = y // block * block, x // block * block
                centre = unit[b, :, y0:y0 + block, x0:x0 + block].mean(dim=(1, 2))
                expected.append(_bruteforce_lists(centre[None], keys, 4)[0])
    assert torch.equal(_all_lookups(shared, 2 * 9 * 10), torch.stack(expected))


def test_blockwise_constant_embeddings_give_the_per_pixel_lists():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64)
    emb = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # [1, 4, 6, 8]
    keys = torch.randn(20, 4, generator=g, dtype=torch.float64)
    shared = block_neighbours(emb, 2, keys, 6)
    per_pixel = knn_exact(torch.nn.functional.normalize(emb.permute(0, 2, 3, 1).reshape(-1, 4), dim=1), keys, 6)[1]
    assert torch.equal(_all_lookups(shared, 48), per_pixel)


def test_shared_neighbours_and_negatives_differ_against_the_exact_search():
    from esskit.data import IGNORE_INDEX
    from esskit.losses import negatives_differ, pixels_last, shared_neighbours

    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 5, 8, 8, generator=g)
    class_emb = torch.randn(30, 5, generator=g)
    target = torch.randint(0, 30, (2 * 8 * 8,), generator=g)
    target[::7] = IGNORE_INDEX
    mu = torch.nn.functional.normalize(class_emb, dim=1)
    assert shared_neighbours(emb, emb, class_emb, 4, knn_at="label", knn_block=1) is None
    # Features at label size: each label pixel is its own cell, so the shared search is the exact one.
    same = shared_neighbours(emb, emb, class_emb, 4, knn_at="feature", knn_block=1)
    assert not negatives_differ(pixels_last(emb), mu, target, 4, same, rows=37).any()
    blocks = shared_neighbours(emb, emb, class_emb, 4, knn_at="label", knn_block=4)
    differ = negatives_differ(pixels_last(emb), mu, target, 4, blocks, rows=37)
    assert differ.any() and not differ[target == IGNORE_INDEX].any()


# method.knn_at = "feature_exact": a search per decoder pixel, made exact per label pixel by a bound

@pytest.mark.parametrize("grid, label", [(32, 128), (9, 35), (7, 7), (5, 17), (16, 63)])
def test_bilinear_taps_are_interpolates_weights(grid, label):
    values = torch.randn(grid, dtype=torch.float64, generator=torch.Generator().manual_seed(grid * label))
    expected = torch.nn.functional.interpolate(values.view(1, 1, grid, 1), size=(label, 1), mode="bilinear",
                                               align_corners=False).view(-1)
    first, weights = bilinear_taps(label, grid)
    mine = weights[:, 0].double() * values[first] + weights[:, 1].double() * values[(first + 1).clamp_max(grid - 1)]
    # the weights are fp32: each off by up to 2^-24 relative, two taps
    torch.testing.assert_close(mine, expected, rtol=0, atol=2e-7 * float(values.abs().max()))
    assert [_first_tap(i, label, grid) for i in range(label)] == first.tolist()  # the lookup's band, in Python


def _profiling_script(name):
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profiling"))
    return importlib.import_module(name)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("smooth", [True, False])
def test_bounded_neighbours_are_each_label_pixels_exact_lists(normalize, smooth):
    """Against a float64 search on the upsampled embeddings, looked up in uneven chunks, with label
    sizes that are no multiple of the grid (border cells), and small memory budgets (sub-chunks)."""
    g = torch.Generator().manual_seed(int(smooth) + 2 * int(normalize))
    features = torch.randn(2, 6, 9, 7, generator=g)
    if smooth:  # neighbouring decoder pixels alike, as in a trained net: most pixels are proven
        features = (torch.nn.functional.avg_pool2d(features, 3, 1, 1, count_include_pad=False)
                    + torch.randn(2, 6, 1, 1, generator=g))
    keys = torch.randn(300, 6, generator=g)
    keys = torch.nn.functional.normalize(keys, dim=1) if normalize else keys
    size, k = (35, 29), 5
    knn = _profiling_script("knn_bounded").CountingKnn()  # knn_exact, counting queries
    shared = bounded_neighbours(features, size, keys, k, knn, normalize, chunk_bytes=2**15)
    assert knn.calls == [2 * 9 * 7]  # one search per decoder pixel
    up = torch.nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)
    x = up.permute(0, 2, 3, 1).reshape(-1, 6)
    found = torch.cat([shared.lookup(s, min(s + 97, len(x)), x[s:s + 97]) for s in range(0, len(x), 97)])
    fallback = sum(knn.calls[1:])
    assert 0 < fallback < len(x) if not smooth else fallback < len(x) // 10  # both paths run
    q = (x / x.norm(dim=1, keepdim=True) if normalize else x).double()
    dist = torch.cdist(q, keys.double()) ** 2
    ref = dist.sort(1)
    separated = ref.values[:, k] - ref.values[:, k - 1] > 1e-5
    assert separated.float().mean() > 0.99
    assert torch.equal(found[separated].sort(1).values, ref.indices[separated, :k].sort(1).values)
    # nearest first, as the search returns them
    assert (dist.gather(1, found).diff(dim=1) >= -1e-5).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_bounded_negatives_leave_the_target_out_before_the_proof(normalize):
    """lookup(..., target): the k - 1 nearest keys other than each pixel's target, as drop_target
    keeps them of the k nearest; the proof needs one key fewer above the bound, so fewer pixels
    get the full search than for the k nearest."""
    from esskit.knn import drop_target

    g = torch.Generator().manual_seed(7)
    features = torch.nn.functional.avg_pool2d(torch.randn(2, 6, 9, 7, generator=g), 3, 1, 1, count_include_pad=False)
    keys = torch.randn(300, 6, generator=g)
    keys = torch.nn.functional.normalize(keys, dim=1) if normalize else keys
    features = features if normalize else 4 * features  # raw: |x| ~ |mu|, so the bound fails somewhere
    size, k = (35, 29), 6
    up = torch.nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)
    x = up.permute(0, 2, 3, 1).reshape(-1, 6)
    q = (x / x.norm(dim=1, keepdim=True) if normalize else x).double()
    dist = torch.cdist(q, keys.double()) ** 2
    target = torch.randint(0, 300, (len(x),), generator=g)
    target[::2] = dist.argmin(1)[::2]  # often the nearest class, as in training
    fallbacks = []
    for with_target in (False, True):
        knn = _profiling_script("knn_bounded").CountingKnn()
        shared = bounded_neighbours(features, size, keys, k, knn, normalize, chunk_bytes=2**15)
        found = torch.cat([shared.lookup(s, min(s + 97, len(x)), x[s:s + 97], target[s:s + 97] if with_target else None)
                           for s in range(0, len(x), 97)])
        fallbacks.append(sum(knn.calls[1:]))
    assert found.shape == (len(x), k - 1) and 0 < fallbacks[1] < fallbacks[0]
    masked = dist.clone()
    masked[torch.arange(len(x)), target] = float("inf")
    ref = masked.sort(1)
    separated = (ref.values[:, 1:k] - ref.values[:, :k - 1] > 1e-5).all(1)
    assert separated.float().mean() > 0.95
    assert torch.equal(found[separated], ref.indices[separated, :k - 1])
    torch.testing.assert_close(found[separated], drop_target(dist.sort(1).indices[:, :k], target, k - 1)[separated])


def test_bounded_neighbours_stay_exact_for_tiny_raw_embeddings():
    """normalize ranks unit x: raw norms ~1e-3 (the norm is not trained) must not round the scores
    in U (a -|mu|^2 ~ -1 term did: 9 of 8179 pixels wrong)."""
    g = torch.Generator().manual_seed(1)
    emb = 1e-3 * torch.nn.functional.avg_pool2d(torch.randn(2, 4, 16, 16, generator=g), 3, 1, 1,
                                                count_include_pad=False)
    keys = torch.nn.functional.normalize(torch.randn(300, 4, generator=g), dim=1)
    shared = bounded_neighbours(emb, (64, 64), keys, 9, None, True)
    up = torch.nn.functional.interpolate(emb.double(), (64, 64), mode="bilinear", align_corners=False)
    x = up.permute(0, 2, 3, 1).reshape(-1, 4)
    found = shared.lookup(0, len(x), x.float())
    ref = (torch.cdist(x / x.norm(dim=1, keepdim=True), keys.double()) ** 2).sort(1)
    separated = ref.values[:, 9] - ref.values[:, 8] > 1e-5
    assert separated.float().mean() > 0.99
    assert torch.equal(found[separated].sort(1).values, ref.indices[separated, :9].sort(1).values)


def test_bounded_neighbours_leave_small_class_counts_to_the_per_pixel_search():
    features, keys = torch.randn(1, 4, 3, 3), torch.randn(19, 4)
    assert bounded_neighbours(features, (12, 12), keys, 7) is None


def test_knn_bounded_benchmark_compares_with_the_search_per_label_pixel():
    compare = _profiling_script("knn_bounded").compare
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.avg_pool2d(torch.randn(1, 6, 8, 8, generator=g), 3, 1, 1, count_include_pad=False)
    target = torch.randint(0, 200, (1024,), generator=g)
    row = compare(emb, torch.randn(200, 6, generator=g), (32, 32), 5, [2, 3], target)
    assert row["pixels"] == 1024 and row["exact_s"] > 0
    for key, m in (("m2", 10), ("m3", 15)):
        cell = row[key]
        assert cell["m"] == m and cell["differ_and_separated"] == 0 and 0 <= cell["full_search_share"] <= 1
        assert m <= cell["union_slots"] <= 4 * m and cell["seconds"] > 0
        negatives = cell["negatives"]  # the target out before the proof: no more full searches
        assert negatives["full_search_share"] <= cell["full_search_share"] and negatives["seconds"] > 0
        assert negatives["differ_and_separated"] == 0  # fp32 near-ties only

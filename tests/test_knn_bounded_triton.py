"""esskit.knn_bounded_triton, knn_at = "feature_exact"'s lookup in one kernel: exact against float64 brute
force in Triton's interpreter (on this CPU, in a subprocess) and compiling for Hopper (sm_90)."""

import textwrap

import pytest
import torch

from test_knn_triton import _interpreted, compile_for_hopper

triton = pytest.importorskip("triton")

# Shared by the interpreted scripts: decoder features smooth enough that most label pixels are proven
# (as in a trained net) and rough enough that some are not, at a label size no multiple of the grid.
SETUP = """
    import torch, torch.nn.functional as F
    from esskit.knn import bounded_neighbours, knn_backend

    def inputs(normalize, seed, batch=2, classes=200, d=6, grid=(5, 4), size=(19, 15)):
        g = torch.Generator().manual_seed(seed)
        features = F.avg_pool2d(torch.randn(batch, d, *grid, generator=g), 3, 1, 1, count_include_pad=False)
        keys = torch.randn(classes, d, generator=g)
        keys = F.normalize(keys, dim=1) if normalize else keys
        up = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return features, keys, up.permute(0, 2, 3, 1).reshape(-1, d), size, g

    def reference(x, keys, normalize, exclude=None):
        # float64 squared distances, sorted; `exclude` (a class per row) pushed last
        q = (x / x.norm(dim=1, keepdim=True) if normalize else x).double()
        dist = torch.cdist(q, keys.double()) ** 2
        if exclude is not None:
            dist[torch.arange(len(x)), exclude] = float("inf")
        return dist.sort(1)

    def separated(ref, k):
        # the k-th and (k+1)-th apart, and the first k in a strict order: fp32 cannot swap them
        gaps = ref.values[:, 1:k + 1] - ref.values[:, :k]
        return (gaps > 1e-5).all(1)
"""


def _with_setup(body: str):
    return _interpreted(textwrap.dedent(SETUP) + textwrap.dedent(body))


def test_bounded_lookup_kernel_gives_each_label_pixels_exact_nearest():
    """BoundedNeighbours.lookup through the kernel (the fused search's path), proven and unproven
    pixels both present, in uneven chunks; nearest first, as the torch lookup."""
    result = _with_setup("""
        class Counting:  # the fused search, counting the queries of the full searches
            def __init__(self):
                self.search, self.calls = knn_backend("triton"), []
            def fused(self, x, k):
                return self.search.fused(x, k)
            def __call__(self, queries, keys, k):
                self.calls.append(len(queries))
                return self.search(queries, keys, k)

        # a budget of 4 KiB: bands of 3 label rows, so the pixel chunks below start and end inside bands;
        # one image: its features' reshape is a strided view, which the kernels must not read as rows
        for normalize, k, budget, batch in ((True, 4, 2**12, 2), (False, 4, 2**26, 1), (True, 1, 2**26, 1)):
            features, keys, x, size, _ = inputs(normalize, seed=k + normalize, batch=batch)
            knn = Counting()
            shared = bounded_neighbours(features, size, keys, k, knn, normalize, chunk_bytes=budget)
            found = torch.cat([shared.lookup(s, min(s + 200, len(x)), x[s:s + 200]) for s in range(0, len(x), 200)])
            assert knn.calls[0] == features[:, 0].numel() and 0 < sum(knn.calls[1:]) < len(x)  # both paths ran
            ref = reference(x, keys, normalize)
            ok = separated(ref, k)
            assert ok.float().mean() > 0.95
            assert found.dtype == torch.int64 and torch.equal(found[ok], ref.indices[ok, :k]), normalize
            if k > 1:  # Eq. 6's negatives: the k - 1 nearest other than the target
                target = ref.indices[:200, 0].clone()
                target[::2] = 7
                negatives = shared.lookup(0, 200, x[:200], target)
                ref = reference(x[:200], keys, normalize, exclude=target)
                ok = separated(ref, k - 1)
                assert torch.equal(negatives[ok], ref.indices[ok, :k - 1]), normalize
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_bounded_candidates_kernel_equals_the_exact_candidates():
    """Eq. 6's candidates from the bounded lookup (target left out of the union) equal the per-pixel
    search's: the target (ignore pixels: class 0), then its k nearest other classes."""
    result = _with_setup("""
        import esskit.knn_bounded_triton
        from esskit.losses import ess_candidates, shared_neighbours
        per_pixel, redone = esskit.knn_bounded_triton.candidates_triton, []
        def counting(x, *args):  # the fused per-pixel search, for the pixels the bound does not prove
            redone.append(len(x))
            return per_pixel(x, *args)
        esskit.knn_bounded_triton.candidates_triton = counting
        # seeds where the raw bound fails somewhere; 512 bytes: bands of a few rows, and the unproven
        # pixels' full searches 21 rows at a time
        for normalize, seed, budget in ((True, 10, 2**26), (False, 13, 2**9)):
            features, keys, x, size, g = inputs(normalize, seed)
            k = 3
            target = torch.randint(0, len(keys), (len(x),), generator=g)
            near = reference(x, keys, normalize).indices
            target[::3] = near[::3, 0]  # often the nearest class, as in training
            target[::7] = -1
            knn = knn_backend("triton")
            shared = shared_neighbours(features, torch.empty(1, 1, *size), keys, k, knn_at="feature_exact",
                                       knn_block=1, knn=knn, normalize=normalize, chunk_bytes=budget)
            redone.clear()
            got = ess_candidates(x, keys, target, k, rows=64, normalize=normalize, knn=knn, neighbours=shared)
            assert 0 < sum(redone) < len(x) and len(redone) == (1 if budget > 2**20 else -(-sum(redone) // 21))
            assert got.dtype == torch.int32 and torch.equal(got[:, 0].long(), target.clamp_min(0))
            ref = reference(x, keys, normalize, exclude=target.clamp_min(0))
            ok = separated(ref, k)
            assert ok.float().mean() > 0.95
            assert torch.equal(got[ok, 1:].long(), ref.indices[ok, :k]), normalize
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_bounded_kernels_compile_for_hopper():
    from esskit.knn_bounded_triton import _bounded_kernel, _corner_scores_kernel

    ints = ["n", "cell0", "h", "w", "L", "C"]
    signature = {"ids_ptr": "*i32", "f_ptr": "*fp32", "mu_ptr": "*fp32", "musq_ptr": "*fp32", "s_ptr": "*fp32",
                 **dict.fromkeys(ints, "i32")}
    constants = {"D": 12, "LP": 128, "BLOCK": 4, "PAD": -1e30}
    assert compile_for_hopper(_corner_scores_kernel, {**signature, **dict.fromkeys(constants, "constexpr")},
                              constants).asm["cubin"]
    signature = {"s_ptr": "*fp32", "t_ptr": "*i64", "ids_ptr": "*i32", "bounds_ptr": "*fp32", "row_first_ptr": "*i32",
                 "row_w_ptr": "*fp32", "col_first_ptr": "*i32", "col_w_ptr": "*fp32", "out_ptr": "*i32",
                 "ok_ptr": "*i8",
                 **dict.fromkeys(["n", "start", "cell0", "H", "W", "h", "w", "L", "C"], "i32")}
    for has_target, kk, lp, block_n in ((True, 8, 128, 8), (False, 9, 64, 16), (False, 1, 32, 32)):
        constants = {"LP": lp, "KK": kk, "HAS_TARGET": has_target, "BLOCK_N": block_n}
        kernel = compile_for_hopper(_bounded_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
        assert kernel.asm["cubin"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")
def test_compiled_bounded_candidates_match_the_per_pixel_kernel_on_cuda():
    import torch.nn.functional as F

    from esskit.knn import bounded_neighbours, knn_backend, knn_exact
    from esskit.losses import ess_candidates, shared_neighbours

    g = torch.Generator().manual_seed(0)
    features = F.avg_pool2d(torch.randn(2, 12, 32, 32, generator=g), 3, 1, 1, count_include_pad=False).cuda()
    keys = F.normalize(torch.randn(1284, 12, generator=g), dim=1).cuda()
    up = F.interpolate(features, size=(128, 128), mode="bilinear", align_corners=False)
    x = up.permute(0, 2, 3, 1).reshape(-1, 12)
    target = torch.randint(-1, 1284, (len(x),), generator=g).cuda()
    knn = knn_backend("triton")
    shared = shared_neighbours(features, up, keys, 8, knn_at="feature_exact", knn_block=1, knn=knn)
    got = ess_candidates(x, keys, target, 8, rows=4096, knn=knn, neighbours=shared)
    ref = ess_candidates(x, keys, target, 8, rows=4096, knn=knn)
    assert (got == ref).all(1).float().mean() > 0.999  # fp32 near-ties may swap neighbours' order
    # prediction's nearest class (k + 1 = 1), through the kernels as predict_labels runs it; one image too
    nearest = bounded_neighbours(features, (128, 128), keys, 1, knn).lookup(0, len(x), x)
    assert (nearest[:, 0] == knn_exact(F.normalize(x, dim=1), keys, 1)[1][:, 0]).float().mean() > 0.999
    one = len(x) // 2
    nearest = bounded_neighbours(features[:1], (128, 128), keys, 1, knn).lookup(0, one, x[:one])
    assert (nearest[:, 0] == knn_exact(F.normalize(x[:one], dim=1), keys, 1)[1][:, 0]).float().mean() > 0.999

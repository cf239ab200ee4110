"""esskit.knn_triton, the fused kNN kernel: exact against brute force (Triton's interpreter runs it
on this CPU, in a subprocess because TRITON_INTERPRET is read when the kernel is defined) and
compiling for Hopper (sm_90). The trainer runs it end to end in test_loss_triton's CLI test."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esskit.errors import ConfigError
from esskit.knn import knn_backend

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _interpreted(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_fused_knn_is_exact_against_brute_force():
    # Shapes off the 32 x 32 tiles (N, C not multiples of 32), k = 1 ... C (k = C: every key),
    # d from 4 to 33 (padded to 16 / 64 for the dot), ties pushed apart by the reference's check.
    result = _interpreted("""
        import torch
        from esskit.knn_triton import knn_triton
        from test_knn import _assert_matches_reference
        for n, c, d, k, seed in [(1, 3, 4, 1, 0), (33, 5, 7, 3, 1), (70, 130, 12, 9, 2), (100, 37, 33, 20, 3),
                                 (33, 64, 12, 64, 4), (40, 1000, 8, 9, 5)]:
            g = torch.Generator().manual_seed(seed)
            q, key = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
            dist, idx = knn_triton(q, key, k)
            assert dist.dtype == torch.float32 and (dist[:, 1:] >= dist[:, :-1]).all()
            _assert_matches_reference(dist, idx, q.double(), key.double(), k)
            if k == c:  # 64 merge rounds a tile: the slowest case in the interpreter, default tile only
                continue
            # other tiles (the sweep's 64 x 16) and the prefetching loop, one tile or several (the last short)
            for block_n, block_c, prefetch in ((64, 16, False), (32, 16, True), (32, 64, True)):
                dist, idx = knn_triton(q, key, k, block_n=block_n, block_c=block_c, prefetch=prefetch)
                _assert_matches_reference(dist, idx, q.double(), key.double(), k)
        knn_triton.__globals__["LAUNCH_ELEMENTS"] = 32 * 12  # 32 rows per launch: 7 launches below
        q, key = torch.randn(200, 12), torch.randn(50, 12)
        _assert_matches_reference(*knn_triton(q, key, 5), q.double(), key.double(), 5)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_candidates_equal_the_chunked_build():
    # Eq. 6's candidates in one kernel (normalisation, search, target dropped) against losses.ess_candidates
    # on knn_exact: ignore pixels, C = k + 1 (the target always found), no normalisation, d = 33
    result = _interpreted("""
        import torch, torch.nn.functional as F
        from esskit.knn import knn_backend, knn_exact
        from esskit.knn_triton import candidates_triton
        from esskit.losses import ess_candidates
        for n, c, d, k, normalize, seed in [(1, 3, 4, 2, True, 0), (70, 19, 12, 8, True, 1), (45, 9, 7, 8, True, 2),
                                            (100, 300, 12, 6, False, 3), (33, 40, 33, 20, True, 4)]:
            g = torch.Generator().manual_seed(seed)
            x, mu = torch.randn(n, d, generator=g), F.normalize(torch.randn(c, d, generator=g), dim=1)
            target = torch.randint(0, c, (n,), generator=g)
            target[::7] = -1
            ref = ess_candidates(x, mu, target, k, rows=16, normalize=normalize, knn=knn_exact)
            got = candidates_triton(x, mu, target, k, normalize)
            assert got.dtype == torch.int32 and torch.equal(got, ref), (n, c, (got != ref).nonzero()[:5])
            # and through the backend the trainer uses, which takes this path
            got = ess_candidates(x, mu, target, k, rows=16, normalize=normalize, knn=knn_backend("triton"))
            assert torch.equal(got, ref)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_knn_refuses_cpu_tensors_without_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    with pytest.raises(ConfigError, match="method.knn = 'triton' runs on a CUDA GPU"):
        knn_backend("triton")(torch.randn(4, 3), torch.randn(5, 3), 2)


def test_fused_kernels_refuse_an_embedding_past_their_shared_memory():
    # d = 300 pads to 512: ess_full's forward tiles need 385 KiB of sm_90's 227 (Triton's compiler)
    with pytest.raises(ConfigError, match="method.knn = 'triton' runs up to model.embed_dim = 256, not 300"):
        knn_backend("triton")(torch.randn(4, 300), torch.randn(5, 300), 2)


def test_fused_knn_compiles_for_hopper():
    """Triton's own compiler and ptxas build the kernel (with and without prefetch) and the candidates' kernel
    for sm_90 here, without a GPU."""
    from esskit.knn_triton import BLOCK_C, BLOCK_N, _candidates_kernel, _knn_kernel

    signature = {"q_ptr": "*fp32", "k_ptr": "*fp32", "ksq_ptr": "*fp32", "out_d_ptr": "*fp32", "out_i_ptr": "*i64",
                 "n": "i32",
                 **dict.fromkeys(["C", "D", "DP", "KK", "K_PAD", "BLOCK_N", "BLOCK_C", "PREFETCH"], "constexpr")}
    for prefetch in (False, True):
        constants = {"C": 1284, "D": 12, "DP": 16, "KK": 9, "K_PAD": 16, "BLOCK_N": BLOCK_N, "BLOCK_C": BLOCK_C,
                     "PREFETCH": prefetch}
        assert compile_for_hopper(_knn_kernel, signature, constants).asm["cubin"]
    signature = {"x_ptr": "*fp32", "t_ptr": "*i64", "k_ptr": "*fp32", "ksq_ptr": "*fp32", "cand_ptr": "*i32", "n": "i32",
                 **dict.fromkeys([*constants, "NORMALIZE", "EPS"], "constexpr")}
    constants.update(PREFETCH=False, NORMALIZE=True, EPS=1e-12)
    assert compile_for_hopper(_candidates_kernel, signature, constants).asm["cubin"]


def compile_for_hopper(fn, signature: dict, constexprs: dict):
    """`fn` built by Triton's compiler and ptxas for sm_90, 4 warps (skips where this Triton lacks them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except RuntimeError as error:  # a Triton build without the NVIDIA backend's tools
        pytest.skip(f"no CUDA toolchain in this Triton: {error}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")
def test_compiled_fused_knn_matches_knn_exact_on_cuda():
    from test_knn import _assert_matches_reference

    for n, c, d, k in [(5000, 19, 12, 9), (3000, 1284, 12, 9), (500, 10_000, 32, 7)]:
        g = torch.Generator().manual_seed(c)
        q, key = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
        dist, idx = knn_backend("triton")(q.cuda(), key.cuda(), k)
        _assert_matches_reference(dist.cpu(), idx.cpu(), q.double(), key.double(), k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")
def test_compiled_fused_candidates_match_the_chunked_build_on_cuda():
    from esskit.knn import knn_exact
    from esskit.knn_triton import candidates_triton
    from esskit.losses import ess_candidates

    for n, c, d, k in [(5000, 19, 12, 8), (3000, 1284, 12, 8)]:
        g = torch.Generator().manual_seed(c)
        x, mu = torch.randn(n, d, generator=g).cuda(), torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1).cuda()
        target = torch.randint(-1, c, (n,), generator=g).cuda()
        got = candidates_triton(x, mu, target, k).cpu()
        ref = ess_candidates(x, mu, target, k, rows=1024, knn=knn_exact).cpu()
        assert (got == ref).all(1).float().mean() > 0.999  # fp32 near-ties may swap neighbours' order


def test_auto_takes_the_chunked_search_on_cpu_tensors():
    from esskit.config import MethodConfig
    from esskit.knn import knn_exact
    from esskit.knn_triton import fused_by_default

    assert MethodConfig().knn == "torch" and MethodConfig().loss_kernel == "auto"  # DESIGN.md: torch kNN
    q, keys = torch.randn(20, 5), torch.randn(7, 5)
    assert not fused_by_default(q, 3)
    for got, expected in zip(knn_backend("auto")(q, keys, 3), knn_exact(q, keys, 3)):
        assert torch.equal(got, expected)

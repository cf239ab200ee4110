"""esskit.loss_triton (Eq. 6) and esskit.full_loss_triton (Eq. 5, ess_full) as fused Triton
kernels: values and gradients against the brute-force references of test_lean_loss and against the
chunked torch forms (Triton's interpreter runs the kernels on this CPU, in a subprocess:
TRITON_INTERPRET is read when a kernel is defined), the CPU refusal, the trainer end to end, and
the kernels compiling for Hopper (sm_90)."""

import pytest
import torch

from esskit.errors import ConfigError
from esskit.full_loss_triton import check_shared_memory, fused_full_cross_entropy, shared_memory_bytes
from esskit.loss_triton import fused_candidate_cross_entropy
from test_knn_triton import ROOT, _interpreted, compile_for_hopper

triton = pytest.importorskip("triton")


def test_fused_eq6_equals_reference_and_torch_forms():
    result = _interpreted("""
        import torch
        from esskit.data import IGNORE_INDEX
        from esskit.losses import ess_loss
        from test_lean_loss import _assert_same, _grads, _inputs, _reference_ess
        # n not a multiple of the 64-pixel block; d = 6 (padded to 8), 12 (to 16); ignore pixels.
        # Both sums of dL/dmu: per class in registers (C <= LOCAL_MAX_CLASSES) and by atomics.
        import esskit.loss_triton as lt
        for n, c, d, k, normalize, seed in [(150, 12, 6, 4, True, 0), (70, 40, 12, 8, False, 1), (2, 3, 5, 2, True, 2)]:
            x, mu, t = _inputs(n=n, c=c, d=d, seed=seed)
            tau = 0.1 if normalize else 2.0
            reference = _grads(lambda a, m: _reference_ess(a, m, t, k, tau, normalize), x, mu)
            for lt.LOCAL_MAX_CLASSES in (256, 0):
                fused = _grads(lambda a, m: ess_loss(a, m, t, k, tau, normalize=normalize, kernel="triton"), x, mu)
                _assert_same(fused, reference)
            for dense in (False, True):
                torch_form = _grads(lambda a, m: ess_loss(a, m, t, k, tau, normalize=normalize, dense=dense,
                                                          kernel="torch"), x, mu)
                _assert_same(fused, torch_form)
        # The per-class sums at C = 256 (C_pad full) and 257 (atomics); programs of several 16-pixel
        # blocks, the last program short (LOCAL_PROGRAMS = 3 over 300 pixels: 8 blocks each, 3 programs)
        lt.LOCAL_MAX_CLASSES, lt.LOCAL_PROGRAMS = 256, 3
        for c in (256, 257):
            x, mu, t = _inputs(n=300, c=c, d=12, seed=c)
            _assert_same(_grads(lambda a, m: ess_loss(a, m, t, 8, kernel="triton"), x, mu),
                         _grads(lambda a, m: _reference_ess(a, m, t, 8, 0.05, True), x, mu))
        lt.LOCAL_PROGRAMS = 1024
        # random negatives, 8 classes: many pixels add into each class's row (atomics), as in the chunked forms
        x, mu, t = _inputs(n=300, c=8, d=4, seed=7)
        runs = [_grads(lambda a, m: ess_loss(a, m, t, 6, 0.1, negatives="random", kernel=kernel), x, mu)
                for kernel in ("torch", "triton") for _ in [torch.manual_seed(0)]]
        _assert_same(runs[1], runs[0])
        # the atomics' accumulator copies (300 pixels: 5 programs over 3 copies): the same gradients
        lt.ACC_REPLICAS, lt.LOCAL_MAX_CLASSES = 3, 0  # read by the forward, kept for its backward
        torch.manual_seed(0)
        _assert_same(_grads(lambda a, m: ess_loss(a, m, t, 6, 0.1, negatives="random", kernel="triton"), x, mu),
                     runs[0])
        lt.ACC_REPLICAS, lt.LOCAL_MAX_CLASSES = 1, 256
        # every pixel ignored: loss 0 and zero gradients; fp16 embeddings (autocast) keep their dtype
        none = torch.full_like(t, IGNORE_INDEX)
        loss, gx, gmu = _grads(lambda a, m: ess_loss(a, m, none, 3, kernel="triton"), x, mu)
        assert loss.item() == 0.0 and torch.all(gx == 0) and torch.all(gmu == 0)
        half = x.half().requires_grad_(True)
        ess_loss(half, mu, t, 3, kernel="triton").backward()
        assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()
        # k past the unrolled limit: a clear error naming the key (and "auto" takes the torch form)
        from esskit.errors import ConfigError
        x, mu, t = _inputs(n=10, c=70, d=4, seed=3)
        try:
            ess_loss(x.float(), mu.float(), t, 65, kernel="triton")
            raise AssertionError("k = 65 ran")
        except ConfigError as error:
            assert "method.k = 65 is over 64" in str(error)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_eq5_equals_reference_and_torch_forms():
    result = _interpreted("""
        import torch
        import esskit.full_loss_triton as fused
        import esskit.knn_triton
        from esskit.data import IGNORE_INDEX
        from esskit.losses import ess_full_loss
        from test_lean_loss import _assert_same, _grads, _inputs, _reference_full
        # C and n off the 64 x 64 tiles, C = one tile exactly, d padded to 16; ignore pixels
        for n, c, d, normalize, seed in [(150, 12, 6, True, 0), (130, 200, 12, False, 1), (70, 64, 7, True, 2)]:
            x, mu, t = _inputs(n=n, c=c, d=d, seed=seed)
            tau = 0.1 if normalize else 2.0
            ours = _grads(lambda a, m: ess_full_loss(a, m, t, tau, normalize=normalize, kernel="triton"), x, mu)
            _assert_same(ours, _grads(lambda a, m: _reference_full(a, m, t, tau, normalize), x, mu))
            _assert_same(ours, _grads(lambda a, m: ess_full_loss(a, m, t, tau, normalize=normalize, builtin=False),
                                      x, mu))
        # the dL/dmu kernel's pixel splits (several blocks per split, a short last one) and several
        # launches (int32 offsets): the same gradients
        x, mu, t = _inputs(n=200, c=100, d=12, seed=4)
        one = _grads(lambda a, m: ess_full_loss(a, m, t, 0.05, kernel="triton"), x, mu)
        fused.SPLIT_PROGRAMS = 2  # 2 tiles: 1 split of all 4 blocks (64 rows each), the last block short
        _assert_same(_grads(lambda a, m: ess_full_loss(a, m, t, 0.05, kernel="triton"), x, mu), one)
        fused.SPLIT_PROGRAMS = 4
        esskit.knn_triton.LAUNCH_ELEMENTS = 64 * 12 * 3  # launches of 192 + 8 rows: splits of 2
        # blocks, the second with 1 past the launch's rows
        _assert_same(_grads(lambda a, m: ess_full_loss(a, m, t, 0.05, kernel="triton"), x, mu), one)
        none = torch.full_like(t, IGNORE_INDEX)
        loss, gx, gmu = _grads(lambda a, m: ess_full_loss(a, m, none, kernel="triton"), x, mu)
        assert loss.item() == 0.0 and torch.all(gx == 0) and torch.all(gmu == 0)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_kernels_refuse_cpu_tensors_without_the_interpreter():
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    x, mu = torch.randn(4, 3), torch.randn(5, 3)
    cand, target = torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="method.loss_kernel = 'triton' runs on a CUDA GPU"):
        fused_candidate_cross_entropy(x, mu, cand, target, 0.05, True, rows=4)
    with pytest.raises(ConfigError, match="method.loss_kernel = 'triton' runs on a CUDA GPU"):
        fused_full_cross_entropy(x, mu, target, 0.05, True, rows=4)


@pytest.mark.parametrize("method", ["ess", "ess_full"])
def test_cli_trains_with_the_fused_kernels(tmp_path, method):
    tiny = [f"method.name={method}", "train.steps=2", "train.batch_size=2", "data.crop=[32,32]", "data.base_size=[32,32]",
            "data.synthetic_image_size=32", "data.synthetic_train_size=4", "data.synthetic_val_size=2",
            "train.log_every=1", "eval.batch_size=2", "method.knn=triton", "method.loss_kernel=triton",
            "model.embed_dim=8", "method.k=2"]  # k: the interpreter's kNN time grows with its merge rounds
    result = _interpreted("""
        import sys
        from esskit.cli import main
        sys.argv = ["esskit", *sys.argv[1:]]
        main()
    """, "train", str(ROOT / "recipes" / "synthetic.toml"), "--out", str(tmp_path / "run"),
        *[a for s in tiny for a in ("--set", s)], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = (tmp_path / "run" / "config.toml").read_text()
    assert 'loss_kernel = "triton"' in config and 'knn = "triton"' in config
    assert (tmp_path / "run" / "eval.json").is_file()


def test_fused_kernels_compile_for_hopper():
    """Triton's own compiler and ptxas build the six kernels for sm_90 here, without a GPU."""
    from esskit.loss_triton import BLOCK_N, _eq6_backward, _eq6_backward_local, _eq6_forward

    consts = {"D": 12, "DP": 16, "K1": 9, "NORMALIZE": True, "IGNORE": -1, "EPS": 1e-12, "BLOCK_N": BLOCK_N}
    ptrs = {"x_ptr": "*fp32", "mu_ptr": "*fp32", "cand_ptr": "*i32", "t_ptr": "*i64"}
    kernels = [(_eq6_forward, {**ptrs, "loss_ptr": "*fp32", "lse_ptr": "*fp32", "n": "i32", "inv_tau": "fp32"}, {}),
               (_eq6_backward, {**ptrs, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gx_ptr": "*fp16",
                                "acc_ptr": "*fp32", "acc_size": "i32", "replicas": "i32", "n": "i32",
                                "inv_tau": "fp32"}, {"NEED_GX": True}),
               (_eq6_backward_local, {**ptrs, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gx_ptr": "*fp32",
                                      "part_ptr": "*fp32", "n": "i32", "inv_tau": "fp32"},
                {"NEED_GX": True, "CP": 256, "BLOCK_N": 16, "BLOCKS": 128})]
    from esskit.full_loss_triton import BLOCK_C, _full_backward_mu, _full_backward_x, _full_forward

    full = {"C": 1284, "D": 12, "DP": 16, "NORMALIZE": True, "IGNORE": -1, "EPS": 1e-12, "BLOCK_N": BLOCK_N,
            "BLOCK_C": BLOCK_C}
    rows = {"x_ptr": "*fp32", "mu_ptr": "*fp32", "t_ptr": "*i64"}
    kernels += [(_full_forward, {**rows, "loss_ptr": "*fp32", "lse_ptr": "*fp32", "n": "i32", "inv_tau": "fp32"}, full),
                (_full_backward_x, {**rows, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gx_ptr": "*fp32", "n": "i32",
                                    "inv_tau": "fp32"}, full),
                (_full_backward_mu, {**rows, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "part_ptr": "*fp32", "n": "i32",
                                     "inv_tau": "fp32"}, {**full, "SPLIT_BLOCKS": 64})]
    for fn, signature, extra in kernels:
        constexprs = extra if "C" in extra else {**consts, **extra}
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        assert compile_for_hopper(fn, signature, constexprs).asm["cubin"]
    # ess_full's shared memory as `shared_memory_bytes` states it, at a padded d of 16 and 128 (its
    # pixel loop pipelined: SPLIT_BLOCKS >= 2); H100 and H200 allow 227 KiB, d = 256 needs 280
    for d in (12, 100):
        dims = {**full, "D": d, "DP": max(16, 1 << (d - 1).bit_length())}
        for fn, signature, extra in kernels[3:]:
            constexprs = {**dims, **({"SPLIT_BLOCKS": 2} if "SPLIT_BLOCKS" in extra else {})}
            shared = compile_for_hopper(fn, {**signature, **dict.fromkeys(constexprs, "constexpr")},
                                        constexprs).metadata.shared
            assert shared <= shared_memory_bytes(d) and (fn is not _full_backward_mu or shared > 0.9 * shared_memory_bytes(d))
    check_shared_memory(12, 232_448, "H100")
    with pytest.raises(ConfigError, match="needs 273 KiB of shared memory per block at model.embed_dim = 200; "
                                          "H100 has 227 KiB: set method.loss_kernel = 'torch'"):
        check_shared_memory(200, 232_448, "H100")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")
def test_compiled_fused_kernels_match_the_torch_forms_on_cuda():
    from test_lean_loss import _assert_same, _grads, _inputs

    from esskit.losses import ess_full_loss, ess_loss

    for n, c, d, k in [(5000, 19, 12, 8), (3000, 1284, 12, 8), (2000, 10_000, 32, 6)]:
        x, mu, t = (v.cuda() for v in _inputs(n=n, c=c, d=d, seed=c))
        fused = _grads(lambda a, m: ess_loss(a, m, t, k, kernel="triton"), x, mu)
        _assert_same(fused, _grads(lambda a, m: ess_loss(a, m, t, k, kernel="torch"), x, mu))
        full = _grads(lambda a, m: ess_full_loss(a, m, t, kernel="triton"), x, mu)
        _assert_same(full, _grads(lambda a, m: ess_full_loss(a, m, t, builtin=False), x, mu))


def test_fused_kernels_with_the_shared_searches():
    """knn_at = "feature" and knn_block = 4 (the GPU run's approximate cells) and "feature_exact" (its
    bounded lookup kernel) through the fused kNN and Eq. 6 kernels give the torch path's loss and gradients."""
    result = _interpreted("""
        import dataclasses
        import torch
        from esskit.config import MethodConfig
        from esskit.knn import knn_backend
        from esskit.losses import ess_paper_loss
        from test_lean_loss import _assert_same
        g = torch.Generator().manual_seed(0)
        emb, mu = torch.randn(2, 6, 4, 4, generator=g), torch.randn(40, 6, generator=g)
        target = torch.randint(0, 40, (2, 16, 16), generator=g)
        target[0, :3] = -1
        for share in ({"knn_at": "feature"}, {"knn_block": 4}, {"knn_at": "feature_exact"}):
            runs = []
            for kernel in ("torch", "triton"):
                cfg = dataclasses.replace(MethodConfig(), k=5, knn=kernel, loss_kernel=kernel, **share)
                e, m = emb.clone().requires_grad_(True), mu.clone().requires_grad_(True)
                loss = ess_paper_loss(e, m, target, cfg, knn_backend(cfg.knn, 2**20))
                loss.backward()
                runs.append((loss.detach(), e.grad, m.grad))
            _assert_same(runs[1], runs[0])
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_eq6_backward_keeps_the_forwards_block_size():
    """bench_loss.py's ess_fused_b32 sets BLOCK_N around the forward only: the backward (atomic
    path) must launch with the same pixels per program."""
    result = _interpreted("""
        import torch
        import esskit.loss_triton as fused
        g = torch.Generator().manual_seed(0)
        x, mu = torch.randn(40, 6, generator=g).requires_grad_(True), torch.randn(9, 6, generator=g)
        cand = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(40)]).int()
        target = cand[:, 0].long()
        seen, real = [], fused._constants
        fused._constants = lambda *a: seen.append(a[-1]) or real(*a)
        fused.LOCAL_MAX_CLASSES, fused.BLOCK_N = 0, 32
        loss = fused.fused_candidate_cross_entropy(x, mu, cand, target, 0.05, True, rows=40)
        fused.BLOCK_N = 64
        loss.backward()
        assert seen == [32, 32], seen
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

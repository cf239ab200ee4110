"""Where an ESS training step spends its time on a GPU, and how fast the kNN's top-k selection is.

1. `torch.profiler` over a few training steps of `esskit profile`'s own step (ResNet50, crop
   512², batch 8 by default) per (method, C): the kernels that take the most GPU time.
2. The selection inside the exact kNN (`esskit.knn.knn_exact`): `torch.topk` on one 64 MiB
   distance block [rows, C] against k+1 passes of `max` (exact too: same values), per C.
3. The whole search: `knn_exact` (chunked matmul + topk) against `knn_triton` (one fused kernel)
   on 2M queries (8 x 512^2 pixels), d = 12, per C, with the fused results checked against it.

    python profiling/step_breakdown.py --out profiling/results/step_breakdown-cuda   # needs a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from esskit.config import PROFILE_INPUTS, build_config
from esskit.files import write_atomic
from esskit.profile.step import MixedPrecision, build_training, cell_config, synthetic_batch, training_step


def step_table(method: str, classes: int, batch: int, crop: int, steps: int = 3, rows: int = 25,
               backbone: str = "resnet50", device: str = "cuda", knn: str = "torch",
               loss_kernel: str = "torch", knn_at: str = "label", inputs: str = "noise") -> str:
    """The profiler's table of `steps` training steps after two warm-up steps, by own GPU time."""
    method_keys = {"knn": knn, "loss_kernel": loss_kernel, "knn_at": knn_at}
    cfg = cell_config(build_config({"method": method_keys}), method=method, num_classes=classes,
                      backbone=backbone, crop=(crop, crop), precision="no")
    model, optimizer = build_training(cfg, device)
    amp = MixedPrecision("no", device)
    images, target = synthetic_batch(cfg, batch, device, inputs)
    for _ in range(2):
        training_step(model, optimizer, images, target, cfg, amp)
    gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            training_step(model, optimizer, images, target, cfg, amp)
        if gpu:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def topk_by_max(d: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values per row by k passes of min (each found entry then set to +inf)."""
    d = d.clone()
    values = []
    for _ in range(k):
        v, i = d.min(1)
        values.append(v)
        d.scatter_(1, i[:, None], float("inf"))
    return torch.stack(values, 1)


def gpu_seconds(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def selection_rows(classes: list[int], k: int, block_mib: int = 64) -> Iterator[dict]:
    for c in classes:
        rows = block_mib * 2**20 // (4 * c)
        d = torch.rand(rows, c, device="cuda")
        by_topk = torch.topk(d, k, dim=1, largest=False, sorted=True).values
        assert torch.equal(topk_by_max(d, k), by_topk)  # exact: the same k values, in order
        topk_s = gpu_seconds(lambda: torch.topk(d, k, dim=1, largest=False, sorted=True))
        max_s = gpu_seconds(lambda: topk_by_max(d, k))
        copy_s = gpu_seconds(lambda: d.clone())  # a bandwidth yardstick: one read + one write
        yield {"classes": c, "rows": rows, "k": k, "topk_ms": round(topk_s * 1e3, 3),
               "max_passes_ms": round(max_s * 1e3, 3), "clone_ms": round(copy_s * 1e3, 3)}


def knn_variant(spec: str) -> dict:
    """"32x64x4p" -> knn_triton's block_n=32, block_c=64, num_warps=4, prefetch=True (the p)."""
    try:
        block_n, block_c, warps = (int(v) for v in spec.removesuffix("p").split("x"))
    except ValueError:
        raise SystemExit(f"--knn-tiles: {spec!r} is not block_n x block_c x warps[p], e.g. 32x64x4p") from None
    return {"block_n": block_n, "block_c": block_c, "num_warps": warps, "prefetch": spec.endswith("p")}


def knn_rows(classes: list[int], k: int, n: int = 8 * 512 * 512, d: int = 12,
             tiles: list[str] = ()) -> Iterator[dict]:
    """knn_exact against knn_triton per C; with `tiles`, knn_triton's time for each of these
    variants too (checked against knn_exact's distances)."""
    from esskit.knn import knn_exact
    from esskit.knn_triton import knn_triton

    for c in classes:
        queries = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1)
        keys = torch.nn.functional.normalize(torch.randn(c, d, device="cuda"), dim=1)
        exact, fused = knn_exact(queries, keys, k), knn_triton(queries, keys, k)
        row = {"classes": c, "queries": n, "d": d, "k": k,
               "max_dist_diff": float((exact[0] - fused[0]).abs().max()),
               "index_mismatch_frac": float((exact[1] != fused[1]).any(1).float().mean()),
               "exact_ms": round(gpu_seconds(lambda: knn_exact(queries, keys, k), reps=3) * 1e3, 2),
               "triton_ms": round(gpu_seconds(lambda: knn_triton(queries, keys, k), reps=3) * 1e3, 2)}
        for tile in tiles:
            run = lambda: knn_triton(queries, keys, k, **knn_variant(tile))  # noqa: E731
            assert float((run()[0] - exact[0]).abs().max()) < 1e-5
            row[f"triton_{tile}_ms"] = round(gpu_seconds(run, reps=3) * 1e3, 2)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="ess:19,ess:1284,ess_full:1284,baseline:19",
                        help="method:C[:knn[:loss_kernel[:knn_at]]] cells to profile (default torch:torch:label; "
                        "'' skips them)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", choices=PROFILE_INPUTS, default="noise",
                        help="what the profiled steps see (esskit profile --inputs)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--selection-classes", default="19,150,1284,10000,100000")
    parser.add_argument("--k", type=int, default=7, help="k+1 (7: the synthetic and Cityscapes recipes' k = 6)")
    parser.add_argument("--knn-classes", default="19,150,1284,10000,100000", help="'' skips the kNN comparison")
    parser.add_argument("--knn-tiles", default="", help="block_n x block_c x warps of knn_triton to time too, "
                        "p appended for its prefetching loop, e.g. 32x32x4,32x32x4p,16x32x1")
    parser.add_argument("--out", type=Path, default=Path("profiling/results/step_breakdown-cuda"))
    args = parser.parse_args()
    tiles = [t for t in args.knn_tiles.split(",") if t and knn_variant(t)]  # a bad spec fails before any run
    if not torch.cuda.is_available():
        raise SystemExit("step_breakdown.py measures GPU kernels: no CUDA GPU is visible here")
    args.out.mkdir(parents=True, exist_ok=True)
    selection, knn = [], []
    searches = (selection_rows([int(c) for c in args.selection_classes.split(",") if c], args.k),
                knn_rows([int(c) for c in args.knn_classes.split(",") if c], args.k, tiles=tiles))
    for rows, measured in zip((selection, knn), searches):
        for row in measured:  # written after every row: a GPU lease's time box may stop the sweep
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_atomic(args.out / "selection.json", json.dumps({"device": torch.cuda.get_device_name(),
                                                                  "rows": selection, "knn": knn}, indent=1))
    tables = []
    for cell in filter(None, args.cells.split(",")):  # '' skips the step tables
        method, classes, *kernels = cell.split(":")
        knn, loss_kernel, knn_at = kernels + ["torch", "torch", "label"][len(kernels):]
        table = step_table(method, int(classes), args.batch, args.crop, knn=knn, loss_kernel=loss_kernel, knn_at=knn_at,
                           inputs=args.inputs)
        torch.cuda.empty_cache()
        title = f"{cell}, batch {args.batch}, {args.crop}², fp32, {args.inputs} inputs"
        tables.append(f"## {title}\n\n```\n{table}\n```\n")
        write_atomic(args.out / "steps.md",
                     f"# Step breakdown on {torch.cuda.get_device_name()}\n\n" + "\n".join(tables))
        print(tables[-1], flush=True)


if __name__ == "__main__":
    main()

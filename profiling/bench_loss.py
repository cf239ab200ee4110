"""Loss-step benchmark: the per-pixel loss (upsampling included, Eq. 7 excluded) and its backward
for every method and kNN option at several class counts C, all in one run on one device.

    python profiling/bench_loss.py                       # CPU, N = 4 x 128 x 128, d = 12, k = 8
    python profiling/bench_loss.py --classes 19,150 --reps 5 --out /tmp/bench
    python profiling/bench_loss.py --device cuda --batch 8 --size 512 --out profiling/results/bench_loss-cuda

Per (variant, C): median wall time of loss + backward, the kNN's share of it (time inside the
kNN search calls), the peak memory of the loss part above its inputs (fake tensors under
`esskit.profile.estimate.MemoryTracker`, rounded like the CUDA caching allocator), and for the
shared-neighbour options the fraction of pixels whose k negatives differ from the exact per-pixel
ones. On a GPU (--device cuda) the times are synchronised (the kNN's between synchronisations around
each search) and `measured_peak_mib` adds torch.cuda.max_memory_allocated above the inputs. Writes results.csv, results.json, results.md (time (ratio to lean ESS) / kNN share / peak
MiB per cell) and bench_loss.png into --out; `--replot DIR` rewrites the last two from results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from esskit.config import MethodConfig
from esskit.data import IGNORE_INDEX
from esskit.files import save_figure_atomic, write_atomic, write_csv_atomic
from esskit.knn import knn_backend
from esskit.lean_loss import has_builtin_linear_cross_entropy
from esskit.losses import (ess_full_loss, ess_paper_loss, negatives_differ, pixels_last, segmentation_loss,
                           shared_neighbours, upsample)
from esskit.profile.estimate import MemoryTracker
from esskit.profile.measure import failure_reason
from esskit.profile.step import TimedKnn

MIB = 2**20
COLUMNS = ("device", "variant", "classes", "pixels", "d", "k", "time_s", "knn_s", "knn_share", "peak_mib",
           "measured_peak_mib", "ratio_to_ess", "neg_diff_frac", "reps", "note")


def gather_ess(emb, class_emb, target, cfg: MethodConfig, knn):
    """The pre-lean Eq. 6 (esskit before issue 8), for comparison: boolean-mask copy of the kept
    pixels, fp32 [N, k+1, d] gathers of the candidates and their differences."""
    x = pixels_last(upsample(emb, target.shape[-2:]))
    t = target.reshape(-1)
    keep = t != IGNORE_INDEX
    x, t, mu = F.normalize(x[keep], dim=1), t[keep], F.normalize(class_emb.float(), dim=1)
    _, idx = knn(x.detach(), mu.detach(), cfg.k + 1)
    is_target = idx == t[:, None]
    key = torch.arange(cfg.k + 1, device=idx.device).expand_as(idx).masked_fill(is_target, cfg.k + 1)
    neg = idx.gather(1, key.argsort(dim=1)[:, :cfg.k])
    candidates = torch.cat([t[:, None], neg], dim=1)
    logits = -(x[:, None, :] - mu[candidates]).pow(2).sum(-1) / cfg.tau
    return F.cross_entropy(logits, torch.zeros_like(t))


def _full(builtin):
    def loss(emb, class_emb, target, cfg, knn):
        x = pixels_last(upsample(emb, target.shape[-2:]))
        return ess_full_loss(x, class_emb, target.reshape(-1), cfg.tau, chunk_bytes=cfg.loss_chunk_mib * MIB,
                             builtin=builtin, kernel=cfg.loss_kernel)
    return loss


def _ess(dense):
    def loss(emb, class_emb, target, cfg, knn):
        return ess_paper_loss(emb, class_emb, target, cfg, knn, dense=dense)
    return loss


def _fused_with(**constants):
    """ESS with both fused kernels and esskit.loss_triton's constants set (the backward's sum of
    dL/dmu: LOCAL_MAX_CLASSES, ACC_REPLICAS; pixels per program: BLOCK_N)."""
    def loss(emb, class_emb, target, cfg, knn):
        import esskit.loss_triton as fused
        before = {name: getattr(fused, name) for name in constants}
        vars(fused).update(constants)
        try:  # the forward keeps the settings for its backward
            return ess_paper_loss(emb, class_emb, target, cfg, knn)
        finally:
            vars(fused).update(before)
    return loss


def _chunked_candidates(emb, class_emb, target, cfg, knn):
    """ESS with the fused kernels, its candidates built chunk by chunk around the search (a bare
    search function has no `candidates`), as before knn_triton.candidates_triton."""
    return ess_paper_loss(emb, class_emb, target, cfg, lambda queries, keys, k: knn(queries, keys, k))


def _baseline(logits, class_emb, target, cfg, knn):
    return segmentation_loss({"logits": logits}, target, cfg)[0]


# variant -> (loss function, MethodConfig overrides, label)
VARIANTS = {
    "baseline": (_baseline, {"name": "baseline"}, "baseline CE (C-way softmax)"),
    "ess_gather": (gather_ess, {}, "ESS Eq. 6, pre-lean gather"),
    "ess": (_ess(False), {}, "ESS Eq. 6, lean (gathered candidates)"),
    "ess_dense": (_ess(True), {}, "ESS Eq. 6, lean ([rows, C] logit blocks)"),
    "ess_faiss": (ess_paper_loss, {"knn": "faiss"}, "ESS lean, FAISS kNN"),
    "ess_triton": (ess_paper_loss, {"knn": "triton"}, "ESS lean, fused Triton kNN"),
    "ess_fused": (ess_paper_loss, {"knn": "triton", "loss_kernel": "triton"}, "ESS, fused kNN and Eq. 6 kernels"),
    "ess_feature": (ess_paper_loss, {"knn_at": "feature"}, "ESS lean, knn_at=feature"),
    "ess_block2": (ess_paper_loss, {"knn_block": 2}, "ESS lean, knn_block=2"),
    "ess_block4": (ess_paper_loss, {"knn_block": 4}, "ESS lean, knn_block=4"),
    "ess_full": (_full(True), {"name": "ess_full"}, "ess_full, torch linear_cross_entropy"),
    "ess_full_esskit": (_full(False), {"name": "ess_full"}, "ess_full, esskit chunked"),
    "ess_full_fused": (_full(None), {"name": "ess_full", "loss_kernel": "triton"}, "ess_full, fused Triton kernels"),
    "ess_fused_chunked": (_chunked_candidates, {"knn": "triton", "loss_kernel": "triton"},
                          "ESS, fused kernels, candidates built in chunks"),
    "ess_fused_atomic": (_fused_with(LOCAL_MAX_CLASSES=0), {"knn": "triton", "loss_kernel": "triton"},
                         "ESS, fused kernels, dL/dmu by atomics at every C"),
    "ess_fused_r16": (_fused_with(LOCAL_MAX_CLASSES=0, ACC_REPLICAS=16), {"knn": "triton", "loss_kernel": "triton"},
                      "ESS, fused kernels, atomics into 16 accumulator copies"),
    # fewer pixels per program of the forward and the atomic backward: 144 / 255 registers at 64
    # (ptxas, sm_90a, d = 12, k = 8), 72 / 167 at 32, 44 / 80 at 16
    "ess_fused_b32": (_fused_with(BLOCK_N=32), {"knn": "triton", "loss_kernel": "triton"},
                      "ESS, fused kernels, 32-pixel blocks"),
    "ess_fused_b16": (_fused_with(BLOCK_N=16), {"knn": "triton", "loss_kernel": "triton"},
                      "ESS, fused kernels, 16-pixel blocks"),
}


def make_inputs(cfg: MethodConfig, classes: int, batch: int, size: int, d: int, seed: int = 0, device="cpu",
                labels: str = "random"):
    """Stride-4 head output (d channels, or C logits for the baseline), class embeddings, labels
    (2 % ignore pixels): i.i.d. per pixel ("random") or one class per 32 x 32 block ("blocks", the
    spatial coherence of real masks, which decides how often the fused kernels' atomics collide)."""
    g = torch.Generator().manual_seed(seed)
    channels = classes if cfg.name == "baseline" else d
    emb = torch.randn(batch, channels, size // 4, size // 4, generator=g)
    class_emb = torch.randn(classes, d, generator=g)
    if labels == "blocks":
        cells = torch.randint(0, classes, (batch, -(-size // 32), -(-size // 32)), generator=g)
        target = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :size, :size].contiguous()
    else:
        target = torch.randint(0, classes, (batch, size, size), generator=g)
    target.view(-1)[::50] = IGNORE_INDEX
    return tuple(t.to(device) for t in (emb, class_emb, target))


def _sync(device: torch.device):
    """torch.cuda.synchronize for a GPU, None (nothing to wait for) on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def loss_peak_mib(fn, cfg: MethodConfig, classes: int, batch: int, size: int, d: int) -> float | None:
    """Peak bytes of loss + backward above the inputs, on fake tensors."""
    if cfg.knn == "faiss":
        return None  # FAISS takes numpy arrays: no fake tensors; its buffers live outside torch
    with FakeTensorMode(), MemoryTracker(all_true_masks=True) as tracker:
        emb, class_emb, _ = make_inputs(cfg, classes, batch, size, d)
        target = torch.randint(0, classes, (batch, size, size))  # no ignore: masks stay all-true
        emb.requires_grad_(True)
        class_emb.requires_grad_(True)
        base = tracker.live_allocated
        fn(emb, class_emb, target, cfg, knn_backend(cfg.knn, cfg.knn_chunk_mib * MIB)).backward()
    return round((tracker.peak_allocated - base) / MIB, 1)


def fresh(inputs):
    """Copies of (emb, class_emb, target) with gradients required, so each step starts alike."""
    emb, class_emb, target = (t.clone() for t in inputs)
    return emb.requires_grad_(True), class_emb.requires_grad_(True), target


def measured_peak_mib(fn, cfg: MethodConfig, inputs) -> float:
    """torch.cuda.max_memory_allocated of loss + backward above the inputs and their gradients' absence."""
    device = inputs[0].device
    emb, class_emb, target = fresh(inputs)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(emb, class_emb, target, cfg, knn_backend(cfg.knn, cfg.knn_chunk_mib * MIB)).backward()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / MIB, 1)


def time_step(fn, cfg: MethodConfig, inputs, reps: int, budget_s: float) -> tuple[list[float], list[float]]:
    """Wall times of loss + backward and of the kNN inside it, after one warm-up call: always on a GPU
    (Triton compiles there, seconds), on a CPU unless that call is slow (>= 2 s: nothing to compile,
    and time is short). On a GPU the kNN's time comes from separate, synchronised repetitions (the
    synchronisation around each search would slow the step it is part of)."""
    times, knn_times, warm = [], [], False
    sync = _sync(inputs[0].device)
    while len(times) < reps:
        emb, class_emb, target = fresh(inputs)
        knn = TimedKnn(knn_backend(cfg.knn, cfg.knn_chunk_mib * MIB))
        if sync:
            sync()
        start = time.perf_counter()
        fn(emb, class_emb, target, cfg, knn).backward()
        if sync:
            sync()
        elapsed = time.perf_counter() - start
        if sync:  # the searches alone: the loss's forward again, each search between synchronisations
            knn = TimedKnn(knn_backend(cfg.knn, cfg.knn_chunk_mib * MIB), sync)
            with torch.no_grad():
                fn(emb, class_emb, target, cfg, knn)
        if not warm and (sync or elapsed < 2.0):
            warm = True
            continue
        times.append(elapsed)
        knn_times.append(knn.seconds)
        if sum(times) > budget_s:
            break
    return times, knn_times


def differing_fraction(cfg: MethodConfig, inputs, chunk_rows: int = 2**15) -> float | None:
    """Fraction of label pixels whose k negatives (as a set) differ from the exact per-pixel ones."""
    emb, class_emb, target = inputs
    knn = knn_backend(cfg.knn, cfg.knn_chunk_mib * MIB)
    up = upsample(emb, target.shape[-2:])
    shared = shared_neighbours(emb, up, class_emb, cfg.k, knn_at=cfg.knn_at, knn_block=cfg.knn_block, knn=knn)
    if shared is None:
        return None
    t = target.reshape(-1)
    differ = negatives_differ(pixels_last(up), F.normalize(class_emb, dim=1), t, cfg.k, shared, rows=chunk_rows,
                              knn=knn)
    return round(float(differ.sum() / (t != IGNORE_INDEX).sum()), 4)


def unavailable(name: str, cfg: MethodConfig, device: torch.device) -> str | None:
    """Why this variant cannot run here (an optional library or a newer torch), else None."""
    if cfg.knn == "faiss" and importlib.util.find_spec("faiss") is None:
        return "FAISS is not installed"
    runs_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"  # (the tests: interpreted)
    if "triton" in (cfg.knn, cfg.loss_kernel) and (not runs_triton or importlib.util.find_spec("triton") is None):
        return "the Triton kernels need a CUDA GPU"
    if name == "ess_full" and not has_builtin_linear_cross_entropy():
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def bench_cell(name: str, classes: int, args) -> dict:
    fn, sets, _ = VARIANTS[name]
    # the chunked torch code unless a variant names a kernel ("auto" would follow the device)
    cfg = MethodConfig(k=args.k, margin_weight=0.0, knn_chunk_mib=args.knn_chunk_mib,
                       loss_chunk_mib=args.loss_chunk_mib, **{"knn": "torch", "loss_kernel": "torch", **sets})
    row = dict.fromkeys(COLUMNS)
    row.update(device=args.device_name, variant=name, classes=classes, pixels=args.batch * args.size ** 2,
               d=args.d, k=args.k, note="")
    missing = unavailable(name, cfg, args.device)
    if missing:
        row["note"] = f"not run: {missing}"
        return row
    row["peak_mib"] = loss_peak_mib(fn, cfg, classes, args.batch, args.size, args.d)
    if row["peak_mib"] is not None and row["peak_mib"] > args.max_mib:
        row["note"] = f"not timed: needs {row['peak_mib']:,.1f} MiB > --max-mib {args.max_mib:g}"
        return row
    inputs = make_inputs(cfg, classes, args.batch, args.size, args.d, device=args.device, labels=args.labels)
    try:
        if args.device.type == "cuda":
            row["measured_peak_mib"] = measured_peak_mib(fn, cfg, inputs)
        times, knn_times = time_step(fn, cfg, inputs, args.reps, args.budget_s)
    except RuntimeError as error:  # e.g. the baseline's 2^31+-element logits at C = 1284 on a GPU
        reason = failure_reason(error)
        if reason is None:
            raise
        row["note"] = f"not run: {reason}"
        return row
    row.update(time_s=round(statistics.median(times), 4), knn_s=round(statistics.median(knn_times), 4),
               reps=len(times))
    row["knn_share"] = round(row["knn_s"] / row["time_s"], 3)
    row["neg_diff_frac"] = differing_fraction(cfg, inputs)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for i, (name, (_, _, label)) in enumerate(VARIANTS.items()):
        color = f"C{i}"  # the same colour in both panels (FAISS has no memory points)
        mine = sorted((r["classes"], r["time_s"], r["peak_mib"]) for r in rows if r["variant"] == name)
        timed = [(c, t) for c, t, _ in mine if t is not None]
        peaks = [(c, p) for c, _, p in mine if p is not None]
        style = "--" if name in ("ess_gather", "baseline") else "-"
        if timed:
            ax_t.plot(*zip(*timed), "o" + style, color=color, label=label, markersize=4)
        if peaks:
            ax_m.plot(*zip(*peaks), "o" + style, color=color, label=label, markersize=4)
    for ax, label in ((ax_t, "loss + backward (s)"), (ax_m, "peak memory of the loss part (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def table_md(rows: list[dict]) -> str:
    """One line per variant: time (ratio to lean ESS) / kNN share / peak MiB for each C."""
    classes = sorted({r["classes"] for r in rows})
    lines = ["| variant | " + " | ".join(f"C = {c}" for c in classes) + " |", "|---|" + "---|" * len(classes)]
    for name, (_, _, label) in VARIANTS.items():
        cells = []
        for c in classes:
            r = next((r for r in rows if r["variant"] == name and r["classes"] == c), None)
            if r is None:
                cells.append("")
            elif r["time_s"] is None:
                over_cap = r["note"].startswith("not timed: needs") and r["peak_mib"]  # its estimate, not run
                cells.append(f"not run (needs {r['peak_mib']:,.0f} MiB)" if over_cap else r["note"])
            else:
                ratio = f" (×{r['ratio_to_ess']})" if r["ratio_to_ess"] is not None else ""
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:g}"
                cells.append(f"{r['time_s']:.3g} s{ratio} / {100 * r['knn_share']:.0f} % / {peak}")
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _faiss_threads(n: int) -> None:
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def _title(s: dict) -> str:
    return (f"{s['device_name']}; N = {s['batch']}x{s['size']}x{s['size']}, d = {s['d']}, k = {s['k']}, fp32, "
            f"loss chunk {s['loss_chunk_mib']} MiB, kNN block {s['knn_chunk_mib']} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="19,150,1284,10000,100000")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--d", type=int, default=12)
    parser.add_argument("--labels", choices=("random", "blocks"), default="random",
                        help="i.i.d. labels per pixel, or one class per 32 x 32 block (as real masks)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    # Chunks scaled to N = 65,536 pixels as the library defaults (64 MiB) are to a 16 x 512^2 batch.
    parser.add_argument("--loss-chunk-mib", type=int, default=1)
    parser.add_argument("--knn-chunk-mib", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a cell after this long")
    parser.add_argument("--max-mib", type=float, default=3072, help="skip timing cells whose loss needs more")
    parser.add_argument("--threads", type=int, default=1, help="torch (and FAISS) threads")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    parser.add_argument("--device-name", help="the device as the results name it (default: CPU model or GPU name)")
    parser.add_argument("--out", type=Path, default=Path("profiling/results/bench_loss-cpu"))
    parser.add_argument("--replot", type=Path, help="rewrite results.md and the plot of this folder")
    args = parser.parse_args()
    if args.replot:
        payload = json.loads((args.replot / "results.json").read_text())
        (args.replot / "results.md").write_text(table_md(payload["rows"]))
        settings = payload["settings"]
        plot(payload["rows"], args.replot / "bench_loss.png", _title(settings))
        return
    classes = [int(c) for c in args.classes.split(",")]
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:  # before any cell runs: a GPU lease is short
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.device_name = args.device_name or (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                                            else f"CPU ({platform.processor() or platform.machine()})")
    torch.set_num_threads(args.threads)  # see the README: 2 threads on 2 shared cores ran up to 100x slower
    _faiss_threads(args.threads)
    start, rows = time.time(), []
    for c in classes:
        for name in names:
            rows.append(bench_cell(name, c, args))
            print(json.dumps({k: rows[-1][k] for k in ("variant", "classes", "time_s", "knn_share", "peak_mib",
                                                       "neg_diff_frac", "note")}), flush=True)
            ess = next((r["time_s"] for r in rows if r["classes"] == c and r["variant"] == "ess"), None)
            for r in rows:
                if r["classes"] == c and ess and r["time_s"]:
                    r["ratio_to_ess"] = round(r["time_s"] / ess, 2)
            # after each cell, so a run cut short keeps what it measured (the plot after each C: ~1 s)
            save(rows, args, start, with_plot=name == names[-1])


def save(rows: list[dict], args: argparse.Namespace, start: float, with_plot: bool = True) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(args.out / "results.csv", COLUMNS, rows)  # atomic: a time box's SIGTERM may come mid-save
    settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    settings.update(torch=torch.__version__, wall_s=round(time.time() - start, 1))
    write_atomic(args.out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    write_atomic(args.out / "results.md", table_md(rows))
    if with_plot:
        plot(rows, args.out / "bench_loss.png", _title(settings))


if __name__ == "__main__":
    main()

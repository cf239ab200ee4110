"""A static cost model of the fused kNN kernel's variants, for choosing what a GPU should time.

Without a GPU, two things about `esskit.knn_triton._knn_kernel` can still be counted:
1. from its sm_90a build (Triton's compiler, ptxas, nvdisasm; no GPU needed): the instructions a
   thread issues per key tile before any merge, and per merge round (the `while pending` loop),
   plus registers and spills;
2. with numpy: how many merge rounds each tile takes. A round moves one key into each pending row's
   top-k, and the block waits for its slowest row, so a tile costs max over the block's rows of
   the keys that enter that row's top-k.
Together: warp-instructions per query = (tiles x tile + rounds x round) x warps / queries. This is a
prediction to check, not a timing: it ignores latency, occupancy and memory. Calibration: for the
32 x 32 x 4 kernel the H100 timed (before the merge round's rewrite) it predicted a C = 1284 /
C = 150 ratio of 4.4; the H100 measured 24.1 / 4.8 ms, which is 5.0.

    python profiling/knn_kernel_model.py --out profiling/results/knn_kernel_model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = ["32x32x4", "32x32x4p", "64x32x4", "32x64x4", "64x64x8", "128x32x8", "32x128x4", "16x64x2", "32x32x2",
            "64x32x2", "16x32x1", "16x16x1", "32x16x1", "32x16x1p", "64x16x1", "64x16x2", "128x16x4"]
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/")


def build(spec: str, classes: int, d: int, k: int) -> dict:
    """The sm_90a build of one variant -> per-thread instructions per tile and per merge round,
    registers and spill bytes (ptxas -v)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from esskit.knn_triton import _knn_kernel
    from step_breakdown import knn_variant  # the GPU sweep's reading of the same specs

    variant = knn_variant(spec)
    block_n, block_c, warps = variant["block_n"], variant["block_c"], variant["num_warps"]
    constants = {"C": classes, "D": d, "DP": max(16, triton.next_power_of_2(d)), "KK": k,
                 "K_PAD": triton.next_power_of_2(k), "BLOCK_N": block_n, "BLOCK_C": block_c,
                 "PREFETCH": variant["prefetch"]}
    signature = {"q_ptr": "*fp32", "k_ptr": "*fp32", "ksq_ptr": "*fp32", "out_d_ptr": "*fp32", "out_i_ptr": "*i64",
                 "n": "i32", **dict.fromkeys(constants, "constexpr")}
    kernel = triton.compile(ASTSource(fn=_knn_kernel, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cubin").write_bytes(kernel.asm["cubin"])
        (Path(tmp) / "k.ptx").write_text(kernel.asm["ptx"])
        sass = subprocess.run([tools / "nvdisasm", "-c", Path(tmp) / "k.cubin"], capture_output=True, text=True,
                              check=True).stdout
        ptxas = subprocess.run([tools / "ptxas", "-v", "-arch=sm_90a", Path(tmp) / "k.ptx", "-o", os.devnull],
                               capture_output=True, text=True, check=True).stderr
    tile, merge_round = loop_sizes(sass)
    return {"variant": spec, "block_n": block_n, "block_c": block_c, "warps": warps,
            "registers": int(re.search(r"Used (\d+) registers", ptxas).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", ptxas).group(1)),
            "tile_instructions": tile, "round_instructions": merge_round}


def loop_sizes(sass: str) -> tuple[int, int]:
    """(instructions of the tile loop outside the merge loop, instructions of the merge loop): the
    outermost loop before the first EXIT and the largest loop inside it (later backward branches
    are the warp-divergence fallbacks of the shuffles)."""
    labels, loops, count, exit_at = {}, [], 0, None
    for line in sass.splitlines():
        if (label := re.match(r"^(\.L_x_\d+):", line)):
            labels[label.group(1)] = count
        if not INSTRUCTION.match(line):
            continue
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and target.group(1) in labels and exit_at is None:
            loops.append((labels[target.group(1)], count))
        if exit_at is None and re.search(r"\bEXIT\b", line):
            exit_at = count
        count += 1
    outer = max(loops, key=lambda span: span[1] - span[0])
    inner = max((s for s in loops if s != outer and outer[0] <= s[0] and s[1] <= outer[1]),
                key=lambda span: span[1] - span[0])
    size = lambda span: span[1] - span[0] + 1  # noqa: E731
    return size(outer) - size(inner), size(inner)


def random_distances(classes: int, d: int, queries: int, seed: int = 0) -> np.ndarray:
    """[queries, classes] squared distances between random unit queries and keys."""
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    q, keys = unit(rng.standard_normal((queries, d))), unit(rng.standard_normal((classes, d)))
    return ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)


def rounds_per_query(dist: np.ndarray, block_n: int, block_c: int, k: int) -> tuple[float, float]:
    """(tiles, merge rounds) per query of the kernel's merge over the distances [queries, C]."""
    queries, classes = dist.shape
    best, tiles, rounds = np.full((queries, k), np.inf), 0, 0
    for c0 in range(0, classes, block_c):
        tile = dist[:, c0:c0 + block_c]
        union = np.concatenate([best, tile], 1)
        kth = np.partition(union, k - 1, axis=1)[:, k - 1:k]
        rounds += (tile <= kth).sum(1).reshape(-1, block_n).max(1).sum()
        tiles += queries // block_n
        best = np.sort(union, 1)[:, :k]
    return tiles / queries, rounds / queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--classes", default="150,1284")
    parser.add_argument("--k", type=int, default=7, help="k+1, as step_breakdown.py's kNN comparison")
    parser.add_argument("--d", type=int, default=12)
    parser.add_argument("--queries", type=int, default=8192, help="queries simulated (a multiple of 128)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    distances = {c: random_distances(c, args.d, args.queries) for c in classes}  # the same draws for every variant
    rows = []
    for spec in args.variants.split(","):
        row = build(spec, 1284, args.d, args.k)  # C only sets the loop's trip count, not its body
        for c in classes:
            tiles, rounds = rounds_per_query(distances[c], row["block_n"], row["block_c"], args.k)
            row[f"rounds_per_tile_C{c}"] = round(rounds / tiles, 2)
            row[f"warp_instructions_per_query_C{c}"] = round(
                (tiles * row["tile_instructions"] + rounds * row["round_instructions"]) * row["warps"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    default = rows[0]
    cost = lambda r, c: r[f"warp_instructions_per_query_C{c}"]  # noqa: E731
    lines = ["| variant | registers | spill bytes | instructions / tile | / merge round | "
             + " | ".join(f"rounds / tile, C = {c} | predicted vs {default['variant']}, C = {c}" for c in classes)
             + " |", "|---|---|---|---|---|" + "---|---|" * len(classes)]
    for r in sorted(rows, key=lambda r: cost(r, classes[-1])):
        cells = [f"{r[f'rounds_per_tile_C{c}']} | ×{cost(r, c) / cost(default, c):.2f}" for c in classes]
        lines.append(f"| {r['variant']} | {r['registers']} | {r['spill_bytes']} | {r['tile_instructions']} | "
                     f"{r['round_instructions']} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

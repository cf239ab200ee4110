"""Synthetic accuracy study: baseline vs ESS vs ess_full at C = 19, 150, 1284, and the paper's
ablations (Tables 2, 3 and 5) run on the embedded synthetic dataset.

    python profiling/accuracy_study.py                          # every row, about 3 h on 2 CPU cores
    python profiling/accuracy_study.py --groups methods --out /tmp/study --set train.steps=50

Every row is recipes/synthetic.toml + COMMON + the row's keys + --set. The ablation rows take
their keys from recipes/ablations/*.toml (the [method] section, model.norm/embed_dim and
train.batch_size/grad_accum), so the synthetic study flips exactly the switches of the real
ablation recipes; only the data, backbone, crop and schedule are the synthetic ones. A row whose
run directory already holds eval.json is read, not rerun, so an interrupted study continues.
Writes results.csv, results.json, results.md, accuracy_study.png, figure4.png and
figure4_convergence.png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import torch

from esskit import engine
from esskit.config import config_to_dict, load_config
from esskit.errors import TrainingError
from esskit.files import save_figure_atomic, write_atomic, write_csv_atomic

ROOT = Path(__file__).resolve().parents[1]
# How a run computes, not what: a run folder trained with another value of these is reused
SAME_RESULTS = {"method.knn", "method.loss_kernel", "data.num_workers"}
RECIPE = ROOT / "recipes" / "synthetic.toml"
ABLATIONS = ROOT / "recipes" / "ablations"

# A from-scratch ResNet18 at 64 px: the backbone trains at the base lr (backbone_lr_mult = 0.1 is
# for ImageNet-pretrained backbones), each method at its best schedule of the 300-step sweeps
# (results/synthetic-study/lr_sweep.csv and the "schedule" rows; profiling/README.md): ESS needs a
# warm-up, the baseline does not care.
COMMON = ["data.crop=[64,64]", "data.base_size=[64,64]", "data.synthetic_image_size=64", "train.steps=300",
          "train.log_every=25", "train.save_every=0", "train.keep_checkpoints=1", "optim.backbone_lr_mult=1.0"]
ESS_SCHEDULE = ["optim.lr=0.002", "optim.warmup_steps=100"]
BEST_SCHEDULE = {"baseline": ["optim.lr=0.01", "optim.warmup_steps=0"], "ess": ESS_SCHEDULE, "ess_full": ESS_SCHEDULE}
# Table 1: (C, d, k) per dataset size; the synthetic stand-ins for Cityscapes, ADE20k, COCO+LVIS.
TABLE1 = {19: (7, 6), 150: (12, 7), 1284: (12, 8)}
COLUMNS = ("group", "row", "method", "classes", "mIoU", "fwIoU", "pAcc", "mAcc", "final_loss", "emb_norm_first",
           "emb_norm_final", "steps", "images_per_step", "train_s", "overrides", "note")


def method_rows() -> list[tuple[str, str, list[str]]]:
    rows = []
    for c, (d, k) in TABLE1.items():
        for method in ("baseline", "ess", "ess_full"):
            rows.append(("methods", f"c{c}_{method}", [f"data.num_classes={c}", f"model.embed_dim={d}",
                                                       f"method.k={k}", f"method.name={method}"]))
    # Baseline and ESS at C = 19 and 150 with another seed: the size of run-to-run noise.
    rows += [("methods", f"{name}_seed1", keys + ["train.seed=1"]) for _, name, keys in rows[:2] + rows[3:5]]
    return rows


def method_keys(name: str) -> list[str]:
    """The keys of one `methods` row, e.g. "c19_ess"."""
    return dict((n, keys) for _, n, keys in method_rows())[name]


def schedule_rows() -> list[tuple[str, str, list[str]]]:
    """C = 19 around the chosen schedules: ESS without warm-up (the old best, 3e-4, and 1e-3), with
    warm-up at other lrs, and the baseline with warm-up."""
    rows = [("schedule", f"ess_lr{lr}_warmup{w}",
             method_keys("c19_ess") + [f"optim.lr={lr}", f"optim.warmup_steps={w}"])
            for lr, w in (("3e-4", 0), ("1e-3", 0), ("1e-3", 100), ("3e-3", 100))]
    rows.append(("schedule", "baseline_lr1e-2_warmup100",
                 method_keys("c19_baseline") + ["optim.lr=1e-2", "optim.warmup_steps=100"]))
    return rows


def figure4_rows() -> list[tuple[str, str, list[str]]]:
    """The paper's Figure 4 (left), embedding dimension d vs mIoU: C = 19 at d = 4 to 64 (d = 7 is
    c19_ess), a second seed at d >= 12, d = 32 at C = 150 and 1284 (Table 1's d there is 12), and
    ess_full at d = 32."""
    def with_d(name: str, d: int) -> list[str]:
        return [k for k in method_keys(name) if not k.startswith("model.embed_dim=")] + [f"model.embed_dim={d}"]

    rows = [("figure4", f"c19_ess_d{d}", with_d("c19_ess", d)) for d in (4, 12, 16, 32, 64)]
    rows += [("figure4", f"c19_ess_d{d}_seed1", with_d("c19_ess", d) + ["train.seed=1"]) for d in (12, 16, 32, 64)]
    rows += [("figure4", f"c{c}_ess_d32", with_d(f"c{c}_ess", 32)) for c in (150, 1284)]
    rows.append(("figure4", "c150_ess_d32_seed1", with_d("c150_ess", 32) + ["train.seed=1"]))
    rows += [("figure4", f"c{c}_ess_full_d32", with_d(f"c{c}_ess_full", 32)) for c in (19, 150)]
    return rows


def convergence_rows() -> list[tuple[str, str, list[str]]]:
    """The paper's Figure 4 (right): k = 7 random vs 7 nearest negatives, evaluated every 25 steps."""
    return [("convergence", f"c19_ess_k7_{negatives}",
             method_keys("c19_ess") + ["method.k=7", f"method.negatives={negatives}", "train.eval_every=25"])
            for negatives in ("nearest", "random")]


def knob_rows() -> list[tuple[str, str, list[str]]]:
    """C = 19, d = 7: other suspects for ESS's gap to the baseline, one switch each."""
    knobs = {"backbone_lr_x5": "optim.backbone_lr_mult=5.0", "tau0.1": "method.tau=0.1",
             "tau0.025": "method.tau=0.025", "wd1e-3": "optim.weight_decay=0.001"}
    return [("knobs", f"c19_ess_{name}", method_keys("c19_ess") + [key]) for name, key in knobs.items()]


def recipe_keys(path: Path) -> list[str]:
    """The ablation switches of a real recipe, as --set overrides."""
    raw = tomllib.loads(path.read_text())
    keys = [f"method.{k}={_toml(v)}" for k, v in raw.get("method", {}).items()]
    keys += [f"model.{k}={_toml(raw['model'][k])}" for k in ("norm", "embed_dim") if k in raw.get("model", {})]
    keys += [f"train.{k}={_toml(raw['train'][k])}" for k in ("batch_size", "grad_accum") if k in raw.get("train", {})]
    keys.append(f"data.num_classes={raw['data']['num_classes']}")
    return keys


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def ablation_rows() -> list[tuple[str, str, list[str]]]:
    rows = []
    for path in sorted(ABLATIONS.glob("*.toml")):
        group = path.stem.split("_")[0]  # table2 / table3 / table5
        rows.append((group, path.stem, recipe_keys(path)))
    # Table 5's reference rows: the same batches without GA or GN.
    for method, batch in (("baseline", 2), ("ess", 10)):
        keys = recipe_keys(ABLATIONS / f"table5_coco_lvis_{method}_ga.toml")
        rows.append(("table5", f"table5_coco_lvis_{method}", [k for k in keys if not k.startswith("train.grad_accum")]
                     + ["train.grad_accum=1", f"train.batch_size={batch}"]))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def row_config(keys: list[str], extra: list[str] = ()):
    """The synthetic recipe with COMMON, the row method's best schedule, the row's keys and `extra`."""
    method = next((k.split("=", 1)[1].strip('"') for k in keys if k.startswith("method.name=")), "ess")
    return load_config(RECIPE, COMMON + BEST_SCHEDULE[method] + keys + list(extra))


def run_row(group: str, name: str, keys: list[str], out: Path, extra: list[str]) -> dict:
    run_dir = out / name
    cfg = row_config(keys, extra)
    start = time.time()
    row = {"group": group, "row": name, "method": cfg.method.name, "classes": cfg.data.num_classes,
           "steps": cfg.train.steps, "images_per_step": cfg.train.batch_size * cfg.train.grad_accum,
           "overrides": " ".join(keys + extra)}
    if (run_dir / "config.toml").exists():  # a finished (or cut short) run is reused only for the same settings
        saved = config_to_dict(load_config(run_dir / "config.toml", []))
        changed = [f"{section}.{key}" for section, values in config_to_dict(cfg).items()
                   for key, value in values.items() if saved.get(section, {}).get(key) != value
                   and f"{section}.{key}" not in SAME_RESULTS]
        if changed:
            raise SystemExit(f"{run_dir} was trained with other settings ({', '.join(changed)}); delete it or "
                             f"choose another --out")
    if (run_dir / "diverged.txt").exists():
        return {**row, "note": (run_dir / "diverged.txt").read_text().strip()}
    if not (run_dir / "eval.json").exists():
        try:
            engine.train(cfg, run_dir)
        except TrainingError as error:  # a NaN loss is a result of the ablation, not a crash of the study
            write_atomic(run_dir / "diverged.txt", f"{error}\n")
            return {**row, "note": str(error)}
    metrics = json.loads((run_dir / "eval.json").read_text())
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in logs if "loss" in r]
    # unrounded: the tables and plot labels round once (7.8545 -> 7.85 -> "7.8" would be off by 0.1)
    return {**row, **{k: 100 * metrics[k] for k in ("mIoU", "fwIoU", "pAcc", "mAcc")},
            "final_loss": round(losses[-1]["loss"], 4), "train_s": round(losses[-1]["s_per_step"] * cfg.train.steps),
            # the raw pixel-embedding norm at the first and the last logged step (ESS only)
            "emb_norm_first": _round(losses[0].get("emb_norm")), "emb_norm_final": _round(losses[-1].get("emb_norm")),
            "note": "", "_wall": round(time.time() - start)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def table_md(rows: list[dict]) -> str:
    lines = ["| group | row | method | C | images/step | mIoU | fwIoU | pAcc | mAcc | final loss | emb norm first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mIoU" not in r:
            lines.append(f"| {r['group']} | {r['row']} | {r['method']} | {r['classes']} | {r['images_per_step']} | "
                         f"diverged | | | | | |")
            continue
        lines.append(f"| {r['group']} | {r['row']} | {r['method']} | {r['classes']} | {r['images_per_step']} | "
                     f"{r['mIoU']:.1f} | {r['fwIoU']:.1f} | {r['pAcc']:.1f} | {r['mAcc']:.1f} | {r['final_loss']:.3f} | "
                     + (f"{r['emb_norm_first']} → {r['emb_norm_final']} |" if r.get("emb_norm_first") else "|"))
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2), dpi=120)
    groups = sorted({r["group"] for r in rows})
    colors = {g: f"C{i}" for i, g in enumerate(groups)}
    y = range(len(rows))
    ax.barh(list(y), [r.get("mIoU", 0) for r in rows], color=[colors[r["group"]] for r in rows])
    ax.set_yticks(list(y), [r["row"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r.get("mIoU", 0) + 0.5, i, f"{r['mIoU']:.1f}" if "mIoU" in r else "diverged", va="center", fontsize=6)
    ax.set_xlabel("mIoU (%) on the synthetic validation split")
    ax.set_title(title, fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def _key(row: dict, key: str, default: str) -> str:
    found = [o.split("=", 1)[1] for o in row["overrides"].split() if o.startswith(key + "=")]
    return found[-1] if found else default


def plot_figure4(rows: list[dict], path: Path) -> None:
    """mIoU vs embedding dimension d, one panel per C: ESS rows (methods + figure4 groups, one
    marker per seed) and the baseline's mIoU as a dashed line."""
    plt = _pyplot()
    ess = [r for r in rows if r["method"] == "ess" and r["group"] in ("methods", "figure4") and "mIoU" in r]
    classes = sorted({r["classes"] for r in ess})
    if not classes:
        return
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3), dpi=120, squeeze=False)
    for ax, c in zip(axes[0], classes):
        for seed, marker in (("0", "o"), ("1", "x")):
            points = sorted((int(_key(r, "model.embed_dim", "0")), r["mIoU"]) for r in ess
                            if r["classes"] == c and _key(r, "train.seed", "0") == seed)
            if points:
                ax.plot(*zip(*points), marker=marker, ls="-" if seed == "0" else "", label=f"ESS, seed {seed}")
        base = [r["mIoU"] for r in rows if r["row"] == f"c{c}_baseline" and "mIoU" in r]
        if base:
            ax.axhline(base[0], ls="--", color="gray", label="baseline")
        ax.set_xscale("log", base=2)
        dims = sorted({int(_key(r, "model.embed_dim", "0")) for r in ess if r["classes"] == c})
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
        ax.set_xlabel("embedding dimension d")
        ax.set_title(f"C = {c}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mIoU (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Figure 4 (left) on the synthetic data: ResNet18 from scratch, 64 px, 300 steps", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def plot_convergence(rows: list[dict], out: Path, path: Path) -> None:
    """mIoU over training steps of the `convergence` rows (their runs evaluate every 25 steps)."""
    plt = _pyplot()
    runs = [r for r in rows if r["group"] == "convergence" and "mIoU" in r]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    for r in runs:
        logs = [json.loads(line) for line in (out / r["row"] / "metrics.jsonl").read_text().splitlines()]
        points = sorted({x["step"]: 100 * x["eval"]["mIoU"] for x in logs if "eval" in x}.items())
        label = f"{_key(r, 'method.negatives', 'nearest')} (k = {_key(r, 'method.k', '')})"
        ax.plot(*zip(*points), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Figure 4 (right) on the synthetic data: C = 19, d = 7", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="methods,table2,table3,table5,schedule,figure4,knobs,convergence")
    parser.add_argument("--out", type=Path, default=ROOT / "profiling" / "results" / "synthetic-study")
    parser.add_argument("--set", action="append", default=[], dest="extra", help="extra override for every row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = args.groups.split(",")
    every = method_rows() + ablation_rows() + schedule_rows() + figure4_rows() + knob_rows() + convergence_rows()
    todo = [r for r in every if r[0] in wanted]
    rows = []
    for group, name, keys in todo:
        rows.append(run_row(group, name, keys, args.out, args.extra))
        print(json.dumps({k: rows[-1].get(k) for k in ("row", "mIoU", "pAcc", "final_loss", "_wall", "note")}),
              flush=True)
    write_csv_atomic(args.out / "results.csv", COLUMNS, rows)
    settings = {"recipe": str(RECIPE.relative_to(ROOT)), "common": COMMON, "best_schedule": BEST_SCHEDULE, "extra": args.extra,
                "torch": torch.__version__, "threads": args.threads}
    write_atomic(args.out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    write_atomic(args.out / "results.md", table_md(rows))
    plot(rows, args.out / "accuracy_study.png", "recipes/synthetic.toml, ResNet18 from scratch, 64 px, "
         f"{rows[0]['steps'] if rows else 0} steps, one seed")
    plot_figure4(rows, args.out / "figure4.png")
    plot_convergence(rows, args.out, args.out / "figure4_convergence.png")


if __name__ == "__main__":
    main()

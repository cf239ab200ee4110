"""What `esskit profile` shows and writes: a live table, results.csv/json, figure1.png (the paper's
Figure 1: max batch vs C) and table6.md/table7.md (the paper's Tables 6-7 beside ours)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.live import Live
from rich.table import Table

from esskit.files import save_figure_atomic, write_atomic, write_csv_atomic
from esskit.report import console, json_safe
from esskit.profile.search import COLUMNS, ProfileSpec

METHOD_NAMES = {"baseline": "baseline", "ess": "ours (ESS)", "ess_full": "ESS, full softmax"}
METHOD_STYLES = {"baseline": ("tab:red", "o-"), "ess": ("tab:blue", "o-"), "ess_full": ("tab:green", "^--")}
# Paper Tables 6-7 (ResNet50, one 12 GB Titan): dataset and training crop (Table 1) per C, then per
# method the max batch, peak memory (GB), inference (s/img) and training (s/iter) times.
PAPER = {
    19: ("Cityscapes", "400x800", {"baseline": (14, 12.1, 0.195, 4.94), "ess": (12, 10.4, 0.233, 5.34)}),
    150: ("ADE20k", "512x512", {"baseline": (8, 10.3, 0.023, 3.01), "ess": (10, 10.0, 0.026, 4.80)}),
    1284: ("COCO+LVIS", "450x450", {"baseline": (2, 9.94, 0.049, 4.20), "ess": (10, 10.4, 0.036, 5.06)}),
}


class LiveTable:
    """One line per (method, C), redrawn as the search and the timing progress."""

    def __init__(self, spec: ProfileSpec):
        self.spec = spec
        self.rows: dict[tuple[str, int], dict] = {}
        self.live = Live(self._render(), console=console, refresh_per_second=4)

    def __enter__(self):
        self.live.start()
        return self

    def update(self, row: dict) -> None:
        self.rows[(row["method"], row["classes"])] = row
        self.live.update(self._render())

    def _render(self) -> Table:
        s = self.spec
        table = Table(title=f"esskit profile · {s.backbone} · crop {s.crop[0]}x{s.crop[1]} · {s.precision} · "
                            f"budget {s.budget_gib:g} GiB · {s.device}")
        batch = f"batch {s.batch}" if s.batch else "max batch"
        for name in ("method", "C", batch, "peak MiB", "train s/iter", "kNN share", "infer s/img", "source", "status"):
            table.add_column(name, justify="left" if name in ("method", "source", "status") else "right")
        for row in self.rows.values():
            table.add_row(row["method"], str(row["classes"]), _cell(row["batch"]), _cell(row["peak_mib"]),
                          _cell(row["train_s_per_iter"]), _cell(row.get("knn_share")), _cell(row["infer_s_per_img"]),
                          row["source"], row.get("note") or row.get("status", ""))
        return table

    def __exit__(self, *exc):
        self.live.stop()
        return False


def _cell(value) -> str:
    return "" if value is None else str(value)


def write_results(rows: list[dict], settings: dict, out_dir: Path) -> list[Path]:
    """results.csv, results.json, table7.md and, when the max batch was searched (no --batch),
    figure1.png and table6.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Rewritten after every cell, so atomically: a run killed mid-write keeps the last whole files
    write_csv_atomic(out_dir / "results.csv", COLUMNS, rows)
    payload = {"settings": settings, "columns": list(COLUMNS), "rows": rows}
    write_atomic(out_dir / "results.json", json.dumps(json_safe(payload), indent=1) + "\n")
    write_atomic(out_dir / "table7.md", table7(rows, settings))
    names = ["results.csv", "results.json", "table7.md"]
    if not settings.get("batch"):
        plot_figure1(rows, settings, out_dir / "figure1.png")
        write_atomic(out_dir / "table6.md", table6(rows, settings))
        names += ["figure1.png", "table6.md"]
    return [out_dir / n for n in names]


def _title(settings: dict) -> str:
    precision = "fp32" if settings["precision"] == "no" else f"{settings['precision']} AMP"
    # results from before these settings were recorded name no kernels (their command line does)
    kernels = (f"kNN {settings['knn']}, loss kernel {settings['loss_kernel']}, " if "loss_kernel" in settings
               else "")
    inputs = "" if settings.get("inputs", "noise") == "noise" else f"{settings['inputs']} inputs, "
    return (f"{settings['backbone']}, crop {settings['crop']}, d={settings['embed_dim']}, k={settings['k']}, "
            f"{precision}, {kernels}{inputs}{settings['budget_gib']:g} GiB budget, {settings['source']} on "
            f"{settings['device_name']}")


def plot_figure1(rows: list[dict], settings: dict, path: Path) -> None:
    """Max batch vs C (log x) for each method, our numbers as lines, the paper's Table 6 as markers."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, (color, style) in METHOD_STYLES.items():
        mine = sorted((r["classes"], r["max_batch"]) for r in rows if r["method"] == method)
        if mine:
            ax.plot(*zip(*mine), style, color=color, label=f"{METHOD_NAMES[method]}, esskit ({settings['source']})")
            for c, b in mine:
                below = method == "ess_full"  # ESS and ess_full often coincide: label one below
                ax.annotate(str(b), (c, b), textcoords="offset points", xytext=(4, -11 if below else 4), fontsize=8,
                            color=color)
        if settings["backbone"] == "resnet50" and method in PAPER[19][2]:  # the paper's: ResNet50
            paper = [(c, entry[2][method][0]) for c, entry in PAPER.items()]
            ax.plot(*zip(*paper), "s", mfc="none", color=color, label=f"{METHOD_NAMES[method]}, paper Table 6")
    ax.set_xscale("log")
    marks = settings.get("accuracy", [])
    classes = sorted({r["classes"] for r in rows} | {m["classes"] for m in marks})
    close = any(b < 1.5 * a for a, b in zip(classes, classes[1:]))  # 150 and 182 on a log axis
    ax.set_xticks(classes, [str(c) for c in classes], rotation=45 if close else 0)
    ax.set_xlabel("number of classes C")
    ax.set_ylabel("max batch size")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    title = _title(settings).replace(f", {settings['source']} on", f",\n{settings['source']} on")  # fits the width
    ax.set_title(f"Max batch vs C ({title})", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    if marks:  # the paper's right axis: pixel accuracy of trained models at their C
        right = ax.twinx()
        for method in dict.fromkeys(m["method"] for m in marks):
            points = sorted((m["classes"], 100 * m["pAcc"]) for m in marks if m["method"] == method)
            color = METHOD_STYLES.get(method, ("black", ""))[0]
            right.plot(*zip(*points), "*", ms=10, color=color,
                       label=f"{METHOD_NAMES.get(method, method)}, pixel accuracy (--accuracy runs)")
        right.set_ylabel("pixel accuracy (%)")
        right.set_ylim(0, 100)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def _paper_columns(classes: int, method: str) -> tuple[str, tuple | None]:
    if classes not in PAPER:
        return f"- ({classes})", None
    name, crop, numbers = PAPER[classes]
    return f"{name} ({classes}; paper crop {crop})", numbers.get(method)  # no paper row for ess_full


def _fmt(value, digits: int | None = 2) -> str:
    """Our floats with `digits` decimals; `digits=None` prints a number as given (the paper's)."""
    if value is None or value == "":
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) and digits is not None else str(value)


def table6(rows: list[dict], settings: dict) -> str:
    """Paper Table 6 (max batch, peak memory) with esskit's numbers beside it."""
    measured = any(r["source"] == "measured" for r in rows)
    extra = " estimate (GiB) | error vs reserved | error vs allocated |" if measured else ""
    lines = ["# Table 6: max batch and peak training memory on one GPU\n",
             f"esskit: {_title(settings)}. Paper: ResNet50 on a 12 GB Titan, GB as printed.\n",
             "| dataset (C) | model | paper batch | paper memory (GB) | esskit max batch | esskit peak (GiB) "
             "| source |" + extra, "|---|---|---|---|---|---|---|" + "---|" * extra.count("|")]
    for row in _by_classes(rows):
        dataset, paper = _paper_columns(row["classes"], row["method"])
        peak = None if row["peak_mib"] is None else row["peak_mib"] / 1024
        line = (f"| {dataset} | {METHOD_NAMES[row['method']]} | {_fmt(paper and paper[0])} | "
                f"{_fmt(paper and paper[1], None)} | {row['max_batch']} | {_fmt(peak)} | {row['source']} |")
        if measured:
            estimate = row.get("estimated_peak_mib")
            line += (f" {_fmt(estimate and estimate / 1024)} | {_error(estimate, row['peak_mib'])} | "
                     f"{_error(row.get('estimated_peak_allocated_mib'), row.get('peak_allocated_mib'))} |")
        lines.append(line)
    text = "\n".join(lines) + "\n\n"
    if measured:
        text += ("The estimate is `--device meta` at the same batch and budget, as the estimator stood when the "
                 "row was measured (how it models reserved memory: profiling/README.md); it cannot see cuDNN's "
                 "workspaces, so it reads low.\n\n")
    return text + _footnote(rows)


def _error(estimate: float | None, measured: float | None) -> str:
    """The estimate's signed error relative to a measurement, in percent."""
    if not estimate or not measured:
        return "-"
    return f"{100 * (estimate - measured) / measured:+.1f} %"


def table7(rows: list[dict], settings: dict) -> str:
    """Paper Table 7 (inference s/img, training s/iter) with esskit's numbers beside it, the
    training time per image as a ratio to the baseline's at the same C, and the kNN's share."""
    at = f"batch {settings['batch']}" if settings.get("batch") else "the max batch"
    lines = ["# Table 7: inference and training time\n",
             f"esskit: {_title(settings)}; inference on one crop-sized image, training at {at}. The paper "
             "timed inference at 1024x2048 (Cityscapes) and 512x512 (ADE20k, COCO+LVIS) at the largest batch "
             "that fits, training at its Table 1 crop (in the first column) and batch.\n",
             "| dataset (C) | model | paper inference (s/img) | paper training (s/iter) | esskit inference (s/img) "
             "| esskit training (s/iter) | esskit training (s/img) | × baseline (s/img) | kNN share | esskit batch "
             "| source |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in _by_classes(rows):
        dataset, paper = _paper_columns(row["classes"], row["method"])
        base = next((r["train_s_per_img"] for r in rows if r["method"] == "baseline" and r["classes"] == row["classes"]),
                    None)
        ratio = round(row["train_s_per_img"] / base, 3) if base and row["train_s_per_img"] else None
        share = None if row.get("knn_share") is None else f"{100 * row['knn_share']:.1f} %"
        lines.append(f"| {dataset} | {METHOD_NAMES[row['method']]} | {_fmt(paper and paper[2], None)} | "
                     f"{_fmt(paper and paper[3], None)} | {_fmt(row['infer_s_per_img'], 4)} | "
                     f"{_fmt(row['train_s_per_iter'], 4)} | {_fmt(row['train_s_per_img'], 4)} | {_fmt(ratio)} | "
                     f"{_fmt(share)} | {row.get('batch', row['max_batch'])} | {row['source']} |")
    text = "\n".join(lines) + "\n\n"
    if any(r["method"] == "ess_full" and r.get("knn_share") is not None for r in rows):
        text += ("ess_full's kNN share is Eq. 7's search (each class's nearest other class); its loss searches "
                 "nothing.\n\n")
    if any(r["source"] == "estimated" for r in rows):
        text += ("Estimated rows have no times: fake tensors do no arithmetic. Run `--device cuda` on a GPU, or "
                 "`--device cpu` for CPU times.\n\n")
    return text + _footnote(rows)


def _by_classes(rows: list[dict]) -> list[dict]:
    order = list(METHOD_NAMES)
    return sorted(rows, key=lambda r: (r["classes"], order.index(r["method"])))


def _footnote(rows: list[dict]) -> str:
    notes = [f"- {METHOD_NAMES[r['method']]}, C={r['classes']}: {r['note']}" for r in _by_classes(rows) if r["note"]]
    return ("Notes:\n" + "\n".join(notes) + "\n") if notes else ""

"""The `esskit` command line (Typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from esskit.config import load_config
from esskit.errors import ConfigError, EsskitError

app = typer.Typer(help="ESS: semantic segmentation with thousands of classes on one GPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

Recipe = Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/synthetic.toml")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value")]


def option_or_none(kind: type, help: str):
    """An option that is None unless given (its default then comes from the recipe or the code)."""
    return Annotated[Optional[kind], typer.Option(help=help)]


# One-line errors: esskit's own, and the environment's (permissions, a full disk, a directory where a
# file belongs), whose message names the path
USER_ERRORS = (EsskitError, OSError)


def _fail(error: Exception) -> None:
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: torch prepends the worker's traceback
        message = message.strip().splitlines()[-1].split(f"{type(error).__name__}: ", 1)[-1]
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(recipe: Recipe, overrides: Overrides = None,
          out: Annotated[Optional[Path], typer.Option(help="Run directory (default: train.out_dir)")] = None,
          resume: Annotated[Optional[Path], typer.Option(help="Continue the newest checkpoint of this run directory")] = None):
    """Train a model from a recipe; leaves config.toml, metrics.jsonl, checkpoints and eval.json."""
    from esskit import engine

    try:
        if resume and out and out.resolve() != resume.resolve():
            raise ConfigError(f"--out {out} with --resume {resume}: a resumed run keeps writing into {resume}; "
                              f"drop --out or make it {resume}")
        cfg = load_config(recipe, overrides or [])
        if not (resume or out or cfg.train.out_dir.strip()):  # Path("") would train into the current directory
            raise ConfigError("train.out_dir is empty; name a run directory there or pass --out")
        run_dir = resume or out or Path(cfg.train.out_dir)
        engine.train(cfg, run_dir, resume=resume is not None)
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def evaluate(recipe: Recipe,
             checkpoint: Annotated[Path, typer.Option(help="Run directory or checkpoint directory")],
             overrides: Overrides = None,
             per_class: Annotated[bool, typer.Option("--per-class", help="Also per-class IoU by class frequency: "
                                                     "table, per_class.csv and per_class_miou.png (Fig. 6)")] = False):
    """Evaluate a checkpoint on the recipe's validation split; writes eval.json in the run directory."""
    from esskit import engine

    try:
        cfg = load_config(recipe, overrides or [])
        result = engine.evaluate_checkpoint(cfg, checkpoint)
        if per_class:
            from accelerate import PartialState

            from esskit.checkpoint import find_checkpoint
            from esskit.palette import class_names
            from esskit.per_class import write_per_class

            if PartialState().is_main_process:
                write_per_class(result, class_names(cfg.data), find_checkpoint(checkpoint).parent,
                                f"{cfg.method.name} · {cfg.data.name}")
    except USER_ERRORS as e:
        _fail(e)


@app.command("build-dataset")
def build_dataset(
        name: Annotated[str, typer.Argument(help="Dataset to build: coco-lvis (the others are read as downloaded)")],
        lvis_json: Annotated[Path, typer.Option(help="LVIS v1 annotations, e.g. lvis_v1_train.json")],
        stuff_json: Annotated[list[Path], typer.Option(help="COCO-Stuff 2017 JSON, e.g. stuff_train2017.json; "
                                                            "repeat to merge several (lvis_v1_val needs both)")],
        out: Annotated[Path, typer.Option(help="Mask folder, e.g. <data.root>/masks/train")],
        workers: Annotated[int, typer.Option(help="Worker processes; 0 = one per CPU core")] = 0):
    """Build the COCO+LVIS masks: one 16-bit PNG per image plus classes.json; resumable."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from esskit.errors import DataError

    if name != "coco-lvis":
        _fail(DataError(f"build-dataset {name!r}: only 'coco-lvis' needs building; `esskit datasets` lists layouts"))
    from esskit.data.coco_lvis import build_masks

    columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("coco-lvis masks", total=None)

            def progress(done: int, total: int, errors: list[str]) -> None:
                bar.update(task, completed=done, total=total)
                for line in errors:
                    bar.console.print(f"corrupt {line}", markup=False, highlight=False)

            report = build_masks(lvis_json, stuff_json, out, workers, progress)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"coco-lvis: {report.written} masks written, {report.skipped} already present, in {out}")
    if report.without_stuff:
        typer.echo(f"warning: {report.without_stuff} images are in no --stuff-json file; their stuff is "
                   "unlabeled (lvis_v1_val.json needs stuff_train2017.json and stuff_val2017.json)", err=True)
    if report.failed:
        typer.echo(f"error: {report.failed} images not written: {len(report.errors)} corrupt annotations "
                   "(listed above); fix or drop them and rerun: finished masks are kept, and classes.json "
                   "(which marks a complete build) is written once every image is", err=True)
        raise typer.Exit(1)


@app.command("datasets")
def list_datasets():
    """List the supported datasets (data.name), the on-disk layout each expects and where to get it."""
    from importlib import import_module

    from esskit.data import DATASETS

    for name, load in DATASETS.items():
        if not hasattr(load, "module"):
            typer.echo(f"{name} (any number of classes)\n  layout: none, generated on the fly\n")
            continue
        module = import_module(load.module)
        typer.echo(f"{name} ({getattr(module, 'NUM_CLASSES', 'data.num_classes')} classes)\n"
                   f"  layout under data.root: {module.LAYOUT}\n  get it: {module.SOURCE}\n")


@app.command()
def profile(recipe: Annotated[Optional[Path], typer.Argument(help="Optional recipe for the other settings "
                                                             "(method.k, model.embed_dim, ...)")] = None,
            classes: option_or_none(str, "Class counts C, comma-separated (default: the recipe's "
                                         "profile.classes, else 19,150,182,1284)") = None,
            methods: option_or_none(str, "Methods, comma-separated: baseline, ess, ess_full (default: "
                                         "profile.methods, else baseline,ess)") = None,
            backbone: option_or_none(str, "timm backbone (default: the recipe's, else resnet50)") = None,
            crop: option_or_none(str, "Training crop SIZE or HxW (default: the recipe's, else 512)") = None,
            budget_gib: option_or_none(float, "GPU memory budget in GiB (default: profile.budget_gib, 12: "
                                              "the paper's 12 GB card)") = None,
            mixed_precision: option_or_none(str, "no, fp16 or bf16 (default: the recipe's, else no)") = None,
            device: option_or_none(str, "cuda: measure on the GPU; meta: estimate on the CPU; cpu: the "
                                        "estimate, with step and kNN times measured on the CPU (default: "
                                        "profile.device, else cuda when available)") = None,
            max_batch: option_or_none(int, "Largest batch size the search tries (default: profile.max_batch, "
                                           "256)") = None,
            batch: option_or_none(int, "No search: peak memory and times at this batch size for every method "
                                       "(equal-batch comparisons; default: profile.batch, 0 = search)") = None,
            inputs: option_or_none(str, "What the timed steps see: noise (random images and labels) or synthetic "
                                        "(the synthetic dataset's images and region labels; default: "
                                        "profile.inputs, else noise)") = None,
            out: option_or_none(Path, "Output directory (default: profiling/results/"
                                      "BACKBONE-CROP-PRECISION[-bN][-synthetic]-DEVICE)") = None,
            accuracy: option_or_none(str, "Trained runs (comma-separated run directories or eval.json files) "
                                          "whose pixel accuracy Figure 1 marks at their C, as the paper's "
                                          "right axis") = None,
            overrides: Overrides = None):
    """Max batch size, peak memory and step times per method and class count (paper Figure 1,
    Tables 6-7); writes results.csv/json, figure1.png, table6.md and table7.md."""
    from esskit import profile as profiling

    try:
        base, recipe_keys = profiling.load_base(recipe, overrides or [], classes)
        spec = profiling.spec_from_options(base, recipe_keys, classes=classes, methods=methods, backbone=backbone,
                                           crop=crop, budget_gib=budget_gib, precision=mixed_precision,
                                           device=device, max_batch=max_batch, batch=batch, inputs=inputs)
        marks = profiling.read_accuracy(accuracy) if accuracy is not None else []
        profiling.run_profile(spec, out or profiling.default_out_dir(spec), marks)
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def predict(images: Annotated[list[Path], typer.Argument(help="Image files and/or directories (searched recursively)")],
            checkpoint: Annotated[Path, typer.Option(help="Run directory (its config.toml is the recipe) or "
                                                     "checkpoint directory")],
            out: Annotated[Path, typer.Option(help="Output directory")],
            overlay: Annotated[bool, typer.Option("--overlay", help="Also NAME_overlay.png: image, colours and "
                                                  "a legend of the classes present")] = False,
            batch_size: Annotated[int, typer.Option(help="Images per forward pass (same-size images only)")] = 1):
    """Segment images at full resolution: NAME_labels.png (class ids; 8-bit up to 256 classes, else
    16-bit; above 65,536 NAME_labels.tif, 32-bit), NAME_color.png (a fixed colour per class) and
    predictions.json (classes per image)."""
    from esskit.predict import run_predict

    try:
        records = run_predict(checkpoint, images, out, overlay, batch_size)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"predicted {len(records)} image{'s' * (len(records) != 1)} into {out}")


@app.command()
def analyze(checkpoint: Annotated[Path, typer.Option(help="Run directory or checkpoint directory")],
            out: Annotated[Path | None, typer.Option(help="Output directory for the figures and tables "
                                                     "(default: RUN_DIR/analysis)")] = None,
            kmeans: Annotated[int, typer.Option(help="k of the k-means grouping of classes (capped at C)")] = 70,
            images: Annotated[int, typer.Option(help="Validation images in the pixel-embedding figures (ESS)")] = 2,
            train_images: Annotated[int, typer.Option(help="Training images counted for class frequency; "
                                                      "0 = all")] = 0):
    """What the class embeddings learned (supp. Figures 13, 15-18): norm vs. frequency, pixel
    embeddings in 2-D and RGB, a dendrogram, k-means groups and each class's nearest classes."""
    from esskit.analyze import run_analysis

    try:
        run_analysis(checkpoint, out, kmeans, images, train_images)
    except USER_ERRORS as e:
        _fail(e)


def main() -> None:
    app()

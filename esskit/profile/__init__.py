"""`esskit profile`: max batch, peak memory and step times per method and class count C
(paper Figure 1, Tables 6-7), measured on a GPU (`measure.py`) or estimated on the CPU (`estimate.py`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
import time
import tomllib
from pathlib import Path

import torch

from esskit.config import PROFILE_INPUTS, Config, config_to_dict, load_config
from esskit.errors import ConfigError
from esskit.models.deeplab import create_backbone
from esskit.profile.report import LiveTable, write_results
from esskit.profile.search import ProfileSpec, profile_grid

DEFAULT_BACKBONE = "resnet50"  # Figure 1 and Tables 6-7
DEFAULT_CROP = 512  # Figure 1: 512x512

__all__ = ["ProfileSpec", "default_out_dir", "load_base", "run_profile", "spec_from_options"]


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option} {text!r} must be comma-separated integers, e.g. 19,150,1284")
    return values


def parse_crop(text: str) -> tuple[int, int]:
    """"512" (square) or "400x800" (H x W)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise ConfigError(f"--crop {text!r} must be SIZE or HEIGHTxWIDTH, e.g. 512 or 400x800")
    return (sizes[0], sizes[-1])


def load_base(recipe: Path | None, overrides: list[str], classes: str | None = None) -> tuple[Config, set[str]]:
    """The recipe (or the defaults) with --set applied, and the section.key names they set. With
    --classes, C is checked as the largest of them (each cell's config is checked at its own C)."""
    largest = []
    if classes is not None:
        counts = parse_ints(classes, "--classes")
        if min(counts) < 2:
            raise ConfigError(f"--classes {classes}: give class counts >= 2, e.g. --classes 19,150,1284")
        # method.k < C binds ess cells only; run_profile checks each (method, C) cell's own config
        largest = [f"data.num_classes={max(counts)}", "method.name=baseline"]
    cfg = load_config(recipe, overrides, hidden=largest)  # validates, with errors that name the key
    keys = {text.split("=", 1)[0].strip() for text in overrides}
    if recipe is not None:
        raw = tomllib.loads(Path(recipe).read_text())
        keys |= {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict)
                 for key in values}
    return cfg, keys


def choose(option, from_recipe, recipe_sets_it: bool, default):
    """A CLI option wins, then the recipe's value when the recipe (or --set) gives one, then the
    profile's own default (the paper's setting rather than the training defaults)."""
    if option is not None:
        return option
    return from_recipe if recipe_sets_it else default


def default_out_dir(spec: ProfileSpec) -> Path:
    precision = "fp32" if spec.precision == "no" else spec.precision
    crop = f"{spec.crop[0]}" if spec.crop[0] == spec.crop[1] else f"{spec.crop[0]}x{spec.crop[1]}"
    batch = f"-b{spec.batch}" if spec.batch else ""
    inputs = "" if spec.base.profile.inputs == "noise" else f"-{spec.base.profile.inputs}"
    return Path("profiling/results") / f"{spec.backbone}-{crop}-{precision}{batch}{inputs}-{spec.device}"


# settings that make a results folder another experiment (torch, date, wall time do not)
GRID_KEYS = ("backbone", "crop", "precision", "budget_gib", "classes", "methods", "batch", "source",
             "max_batch_limit", "embed_dim", "k", "knn_chunk_mib", "loss_chunk_mib", "knn_at", "knn_block", "knn",
             "loss_kernel", "inputs", "config", "device_name")


# settings recorded since a later session, with the value that every earlier run had
RECORDED_SINCE = {"inputs": "noise"}


def check_out_dir(out_dir: Path, settings: dict) -> None:
    """Refuse an --out whose results.json another grid wrote: the first saved cell would replace them."""
    try:
        old = json.loads((out_dir / "results.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    # a folder (or settings) from before a key was recorded ran its default
    old, new = {**RECORDED_SINCE, **old}, {**RECORDED_SINCE, **settings}
    differ = [f"{key} {old[key]} here, {new[key]} now" for key in GRID_KEYS if key in old and old[key] != new.get(key)]
    # a key an older esskit did not record: its run may have had another value
    differ += [f"{key} not recorded here, {new[key]} now" for key in GRID_KEYS if key in new and key not in old]
    if differ:
        raise ConfigError(f"--out {out_dir} holds the results of another profile ({'; '.join(differ)}); name "
                          f"another --out, or delete that folder to replace them")


def make_backend(spec: ProfileSpec):
    if spec.device == "cuda":
        from esskit.profile.measure import CudaMeasurer

        return CudaMeasurer(spec.budget_bytes)
    if spec.device == "cpu":
        from esskit.profile.measure import CpuTimer

        return CpuTimer(spec.budget_bytes)
    from esskit.profile.estimate import Estimator

    return Estimator(spec.budget_bytes)


def read_accuracy(text: str) -> list[dict]:
    """`--accuracy`: the pixel accuracy of trained runs (comma-separated run directories or eval.json
    files, as `esskit train` / `evaluate` write them) that Figure 1 marks at their C, as the paper's does."""
    marks = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        path = Path(item).expanduser()
        file = path / "eval.json" if path.is_dir() else path
        try:
            result = json.loads(file.read_text())
            marks.append({"classes": int(result["num_classes"]), "method": str(result["method"]),
                          "pAcc": float(result["pAcc"]), "run": str(path)})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--accuracy {item}: no readable eval.json there ({type(e).__name__}: {e}); pass run "
                              f"directories that `esskit train` or `esskit evaluate` finished") from None
    if not marks:
        raise ConfigError(f"--accuracy {text!r}: no run given; pass comma-separated run directories")
    return marks


def run_profile(spec: ProfileSpec, out_dir: Path, accuracy: list[dict] = ()) -> list[dict]:
    """Profile every (method, C) of `spec` and write the results into `out_dir`; `accuracy`
    (`read_accuracy`) is marked on Figure 1."""
    for method in spec.methods:  # fail on a bad recipe/--set, backbone or --out before any work
        for num_classes in spec.classes:
            spec.config(method, num_classes)
    with torch.device("meta"):  # no weights: only whether timm builds it
        create_backbone(spec.backbone, pretrained=False)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create that folder ({e.strerror}); name a new or existing "
                          f"folder") from None
    backend = make_backend(spec)
    start = time.perf_counter()
    settings = {
        "backbone": spec.backbone, "crop": f"{spec.crop[0]}x{spec.crop[1]}", "precision": spec.precision,
        "budget_gib": spec.budget_gib, "classes": spec.classes, "methods": spec.methods, "batch": spec.batch,
        "source": backend.source, "device_name": backend.device_name, "max_batch_limit": spec.max_batch,
        "embed_dim": spec.base.model.embed_dim, "k": spec.base.method.k,
        "knn_chunk_mib": spec.base.method.knn_chunk_mib, "loss_chunk_mib": spec.base.method.loss_chunk_mib,
        "knn_at": spec.base.method.knn_at, "knn_block": spec.base.method.knn_block,
        "knn": spec.base.method.knn, "loss_kernel": spec.base.method.loss_kernel,
        "inputs": spec.base.profile.inputs,
        # the rest of the step's settings (model.norm, method.margin_weight, optim, ...): another experiment
        "config": {section: values for section, values in config_to_dict(spec.base).items()
                   if section in ("model", "method", "optim")},
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["esskit", *sys.argv[1:]]),
        **({"accuracy": list(accuracy)} if accuracy else {}),  # what Figure 1 marks (not the grid)
    }
    check_out_dir(out_dir, settings)
    cells = len(spec.methods) * len(spec.classes)

    def save(rows: list[dict]) -> None:
        # After every cell, so a run cut short (a GPU lease's time limit) keeps what it measured.
        write_results(rows, {**settings, "wall_s": round(time.perf_counter() - start, 1),
                             "complete": len(rows) == cells}, out_dir)

    with LiveTable(spec) as table:
        return profile_grid(spec, backend, table.update, save)


def spec_from_options(base: Config, recipe_keys: set[str], *, classes: str | None = None, methods: str | None = None,
                      backbone: str | None = None, crop: str | None = None, budget_gib: float | None = None,
                      precision: str | None = None, device: str | None = None, max_batch: int | None = None,
                      batch: int | None = None, inputs: str | None = None) -> ProfileSpec:
    """The CLI's options over a recipe (its [profile] section gives the grid's defaults); `recipe_keys`
    are the section.key names the recipe or --set gave."""
    size = parse_crop(crop) if crop is not None else None
    recipe_crop = tuple(base.data.crop)
    if inputs is not None:
        if inputs not in PROFILE_INPUTS:
            raise ConfigError(f"--inputs {inputs!r} is not one of {', '.join(PROFILE_INPUTS)}")
        base = dataclasses.replace(base, profile=dataclasses.replace(base.profile, inputs=inputs))
    grid = base.profile
    return ProfileSpec(
        classes=parse_ints(classes, "--classes") if classes is not None else list(grid.classes),
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods is not None else list(grid.methods),
        backbone=choose(backbone, base.model.backbone, "model.backbone" in recipe_keys, DEFAULT_BACKBONE),
        crop=choose(size, recipe_crop, "data.crop" in recipe_keys, (DEFAULT_CROP, DEFAULT_CROP)),
        budget_gib=grid.budget_gib if budget_gib is None else budget_gib,
        precision=choose(precision, base.train.mixed_precision, "train.mixed_precision" in recipe_keys, "no"),
        device=device or grid.device or ("cuda" if torch.cuda.is_available() else "meta"),
        max_batch=grid.max_batch if max_batch is None else max_batch,
        batch=grid.batch if batch is None else batch,
        base=base,
    )

"""`esskit predict`: label masks, colour masks and overlays for images, from a run directory.

The run directory's config.toml is the recipe, so a checkpoint predicts with exactly the model it was
trained as. Images go through the evaluation transforms (full resolution, normalised only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors

from esskit.checkpoint import find_checkpoint, load_weights
from esskit.config import Config, load_config
from esskit.data.images import read_image, write_mask
from esskit.errors import ConfigError, DataError
from esskit.files import make_out_dir, write_atomic
from esskit.inference import infer
from esskit.models import predict_labels
from esskit.palette import class_names, colorize, palette_for

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
LEGEND_ROWS = 20  # classes named in an overlay's legend; the rest are summed into one line
OVERLAY_ALPHA = 0.5  # weight of the colour mask over the image


@dataclass
class Run:
    """A trained model ready for inference, with how to name and colour its classes."""

    cfg: Config
    model: torch.nn.Module
    checkpoint: Path
    accelerator: object
    names: list[str]
    palette: np.ndarray


def load_run(path: Path) -> Run:
    """The newest checkpoint of run directory `path` (or checkpoint directory `path`) with the
    model described by the run's config.toml."""
    from esskit.engine import make_accelerator, model_from_config

    checkpoint = find_checkpoint(path)
    config = checkpoint.parent / "config.toml"
    if not config.is_file():
        raise ConfigError(f"--checkpoint {path}: no config.toml in {checkpoint.parent}; pass a run "
                          f"directory written by `esskit train`")
    cfg = load_config(config)
    # The checkpoint holds every weight: fetching ImageNet weights first would only cost a download.
    cfg.model.pretrained = False
    accelerator = make_accelerator(cfg, training=False)  # an fp16 run from a GPU predicts in fp32 on a CPU
    model = model_from_config(cfg)
    load_weights(model, checkpoint)
    model.to(accelerator.device).eval()
    return Run(cfg, model, checkpoint, accelerator, class_names(cfg.data),
               palette_for(cfg.data.name, cfg.data.num_classes))


def collect_images(inputs: list[Path], out: Path | None = None) -> list[tuple[Path, Path]]:
    """(image, output name without suffix) for each file and each image under each directory;
    a directory's images keep their relative path so that equal file names do not collide. Files
    under `out` (an earlier run's masks, when --out lies inside an input directory) are skipped."""
    found: list[tuple[Path, Path]] = []
    skip = out.resolve() if out is not None else None
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (skip and p.resolve().is_relative_to(skip)))
            if not files:
                raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under directory {item}")
            found += [(p, p.relative_to(item).with_suffix("")) for p in files]
        elif item.is_file():
            found.append((item, Path(item.stem)))
        else:
            raise DataError(f"image {item} not found")
    names: dict[Path, Path] = {}
    for image, name in found:
        if name in names:
            raise DataError(f"{names[name]} and {image} would both write {name}_*.png; predict them into "
                            f"separate --out directories")
        names[name] = image
    return found


def predict_images(run: Run, images: list[tuple[Path, Path]], out: Path, overlay: bool = False,
                   batch_size: int = 1, progress=None) -> list[dict]:
    """Predict and write every image; returns one record per image (name, size, classes present).
    `progress(done, total)` is called after each batch."""
    from esskit.data.transforms import eval_transforms

    make_out_dir(out)
    transform = eval_transforms(run.cfg.data)
    records: list[dict] = []
    pending: list[tuple] = []

    def flush() -> None:
        records.extend(_predict_batch(run, transform, pending, out, overlay))
        pending.clear()
        if progress:
            progress(len(records), len(images))

    for path, name in images:
        try:
            image = read_image(path, upright=True)  # labels as the photo is shown
        except DataError:
            if pending:  # the images before the unreadable one are written
                flush()
            raise
        if pending and (len(pending) == batch_size or pending[0][2].shape != image.shape):
            flush()
        pending.append((path, name, image))
    if pending:
        flush()
    return records


@torch.no_grad()
def _predict_batch(run: Run, transform, pending: list, out: Path, overlay: bool) -> list[dict]:
    """One forward pass over same-size images (batched images must share a size)."""
    batch = torch.stack([transform(tv_tensors.Image(img)).as_subclass(torch.Tensor) for _, _, img in pending])
    batch = batch.to(run.accelerator.device)
    with run.accelerator.autocast():
        output = infer(run.model, batch, run.cfg.eval, coarse=True)  # eval.mode "slide" as `evaluate` runs it
    labels = predict_labels(output, batch.shape[-2:], run.cfg.method.knn_chunk_bytes,
                            run.cfg.method.bounded_search).cpu().numpy()
    return [write_prediction(run, name, img, lab, out, overlay) for (_, name, img), lab in zip(pending, labels)]


def write_prediction(run: Run, name: Path, image: torch.Tensor, labels: np.ndarray, out: Path,
                     overlay: bool) -> dict:
    """Write NAME_labels.png (class ids: 8-bit up to 256 classes, else 16-bit; above 65,536 classes
    NAME_labels.tif, 32-bit), NAME_color.png and optionally NAME_overlay.png (image, colour mask and a
    legend of the classes present)."""
    base = out / name
    base.parent.mkdir(parents=True, exist_ok=True)
    classes = run.cfg.data.num_classes
    bits = 8 if classes <= 256 else 16 if classes <= 65536 else 32
    write_mask(f"{base}_labels.{'tif' if bits == 32 else 'png'}", labels, bits=bits)
    color = colorize(labels, run.palette)
    Image.fromarray(color).save(f"{base}_color.png")
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    present = [(int(ids[i]), int(counts[i]) / labels.size) for i in order]
    if overlay:
        rgb = image.permute(1, 2, 0).numpy()
        overlay_with_legend(rgb, labels, color, present, run.names, run.palette).save(f"{base}_overlay.png")
    return {"image": str(name), "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "classes": [{"id": c, "name": run.names[c], "fraction": round(f, 6)} for c, f in present]}


def overlay_with_legend(rgb: np.ndarray, labels: np.ndarray, color: np.ndarray, present: list[tuple[int, float]],
                        names: list[str], palette: np.ndarray) -> Image.Image:
    """The image blended with its colour mask, region edges drawn dark so that neighbouring classes of
    similar colour stay apart, and a legend of the largest classes to the right."""
    blend = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * color.astype(np.float32)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    blend[edge] *= 0.3
    picture = Image.fromarray(blend.astype(np.uint8))
    legend = draw_legend(present, names, palette, height=picture.height)
    canvas = Image.new("RGB", (picture.width + legend.width, max(picture.height, legend.height)), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (picture.width, 0))
    return canvas


def draw_legend(present: list[tuple[int, float]], names: list[str], palette: np.ndarray,
                height: int) -> Image.Image:
    """Swatch, name and area share of the LEGEND_ROWS largest classes; with more classes than that,
    one last line counts the others, so 1000+ classes never pile up into unreadable text."""
    size = int(np.clip(height / 32, 12, 24))  # readable next to both thumbnails and 4k frames
    font = ImageFont.load_default(size=size)
    shown, rest = present[:LEGEND_ROWS], present[LEGEND_ROWS:]
    lines = [f"{names[c]}  {100 * f:.1f}%" for c, f in shown]
    if rest:
        lines.append(f"+ {len(rest)} more classes  {100 * sum(f for _, f in rest):.1f}%")
    row, pad = int(size * 1.5), size // 2
    width = pad * 3 + size + max(int(font.getlength(line)) for line in lines)
    legend = Image.new("RGB", (width, max(height, pad * 2 + row * len(lines))), "white")
    draw = ImageDraw.Draw(legend)
    for i, line in enumerate(lines):
        y = pad + i * row
        if i < len(shown):
            draw.rectangle([pad, y, pad + size, y + size], fill=tuple(int(v) for v in palette[shown[i][0]]),
                           outline="black")
        draw.text((pad * 2 + size, y), line, fill="black", font=font)
    return legend


def run_predict(checkpoint: Path, inputs: list[Path], out: Path, overlay: bool = False,
                batch_size: int = 1) -> list[dict]:
    """`esskit predict`: check the inputs before building the model, predict under a progress bar
    (stderr, so stdout stays the one summary line), and list what each image holds in
    predictions.json."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    images = collect_images(inputs, out)
    run = load_run(checkpoint)
    columns = [TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=len(images) < 2) as bar:
        task = bar.add_task("predict", total=len(images))
        records = predict_images(run, images, out, overlay, batch_size,
                                 progress=lambda done, total: bar.update(task, completed=done))
    summary = {"checkpoint": str(run.checkpoint), "method": run.cfg.method.name,
               "num_classes": run.cfg.data.num_classes, "images": records}
    write_atomic(out / "predictions.json", json.dumps(summary, indent=1))
    return records

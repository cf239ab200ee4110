"""Typed run configuration: dataclass sections loaded from a TOML recipe plus `--set a.b=value`.

The recipe mirrors the sections one to one; the resolved config written to a run directory is
itself a valid recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from esskit.errors import ConfigError
from esskit.files import write_atomic

METHODS = ("baseline", "ess", "ess_full")  # method.name, and what esskit profile compares
PROFILE_DEVICES = ("meta", "cuda", "cpu")  # esskit profile: estimate; measure on the GPU; estimate + CPU times
PROFILE_INPUTS = ("noise", "synthetic")  # esskit profile: what the timed steps see (ProfileConfig.inputs)
# SyntheticSegmentation's smallest image side (esskit/data/synthetic.py checks it too)
SYNTHETIC_MIN_IMAGE_SIZE = 8


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} = {value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive(section: str, obj, names: list[str], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        # NaN fails no comparison, so it must be refused explicitly (inf is no usable setting either)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            finite = "" if math.isfinite(value) else "a finite number "
            raise ConfigError(f"{section}.{name} = {value!r} must be {finite}{bound}")


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm model with features_only at strides 4 and 16
    pretrained: bool = False  # load timm/HF-hub ImageNet weights for the backbone
    norm: str = "bn"  # "bn" (BatchNorm) or "gn" (GroupNorm, Table 5)
    embed_dim: int = 12  # ESS embedding size d (Table 1: 7 for C <= 21, 12 otherwise)

    def __post_init__(self):
        _check_choice("model", "norm", self.norm, ("bn", "gn"))
        _check_positive("model", self, ["embed_dim"])


@dataclass(kw_only=True)
class MethodConfig:
    name: str = "ess"  # "ess" (Eq. 6 + Eq. 7), "ess_full" (exact softmax over all C + Eq. 7) or "baseline"
    variant: str = "paper"  # "paper" or "essnet" (the official code's normalise-then-upsample, -20*dist)
    k: int = 8  # nearest negative classes per pixel (Table 1)
    tau: float = 0.05  # temperature of the logits -|x-mu|^2/tau
    margin: float = 0.2  # max-margin m of Eq. 7
    margin_weight: float = 1.0  # weight of Eq. 7 in the loss; 0 disables it (Table 3 ablation)
    negatives: str = "nearest"  # "nearest" (kNN) or "random" (Table 2 ablation)
    # L2-normalise pixel and class embeddings. false: Table 3's ablation on raw vectors, whose logits
    # (2 x.mu - |mu|^2) / tau drop the per-pixel |x|^2: exact in fp32 while |x| stays O(1) (1.0-1.4 in
    # profiling/README's study); rounding grows as |x|^2 (gradients ~1e-3 off at |x| = 30)
    normalize: bool = True
    # exact kNN backend: "torch" (chunked; DESIGN.md's default), "auto" (triton on CUDA GPUs, else
    # torch; the GPU recipes set it), "faiss" (optional extra) or "triton" (one fused kernel, CUDA)
    knn: str = "torch"
    knn_chunk_mib: int = 64  # memory budget of one kNN distance block [rows, C] (fp32)
    # "label" (paper): a search per label pixel; "feature": one per stride-4 decoder pixel, shared by the
    # pixels it covers (approximate); "feature_exact": one per decoder pixel, exact per label pixel (a bound)
    knn_at: str = "label"
    # "feature_exact": classes kept per decoder pixel, as a multiple of the k+1 searched (m = 18 at k = 8 and 2):
    # more prove more label pixels (fewer full searches) but lengthen every pixel's union
    knn_bound_keys: int = 2
    knn_block: int = 1  # 1 (paper), 2 or 4: one search per b x b label-pixel block (its mean direction)
    loss_kernel: str = "auto"  # Eq. 6: "auto" (triton on CUDA), "torch" (chunked) or "triton" (fused, CUDA)
    loss_chunk_mib: int = 64  # pixel chunk of the ESS losses: [rows, k+1, d] (ess) or [rows, C] (ess_full)

    def __post_init__(self):
        _check_choice("method", "name", self.name, METHODS)
        _check_choice("method", "variant", self.variant, ("paper", "essnet"))
        _check_choice("method", "negatives", self.negatives, ("nearest", "random"))
        _check_choice("method", "knn", self.knn, ("auto", "torch", "faiss", "triton"))
        _check_choice("method", "knn_at", self.knn_at, ("label", "feature", "feature_exact"))
        _check_choice("method", "loss_kernel", self.loss_kernel, ("auto", "torch", "triton"))
        _check_choice("method", "knn_block", self.knn_block, (1, 2, 4))
        _check_positive("method", self, ["k", "tau", "knn_chunk_mib", "loss_chunk_mib", "knn_bound_keys"])
        _check_positive("method", self, ["margin", "margin_weight"], allow_zero=True)
        if self.knn_at != "label" and self.knn_block > 1:
            raise ConfigError(f"method.knn_at = {self.knn_at!r} and method.knn_block > 1 are alternatives; set one")
        if self.variant == "essnet" and (self.knn_at != "label" or self.knn_block > 1):
            raise ConfigError("method.knn_at / method.knn_block apply to variant 'paper'; variant 'essnet' "
                              "searches per label pixel like the official code")
        # essnet_loss hard-codes nearest negatives, unit embeddings and logits -20*|x-mu| (no tau);
        # only name "ess" runs it (ess_full uses tau and normalize).
        if self.name == "ess" and self.variant == "essnet":
            fixed = {"negatives": "nearest", "normalize": True, "tau": MethodConfig.tau}
            changed = [f"method.{key} = {getattr(self, key)!r}" for key, value in fixed.items()
                       if getattr(self, key) != value]
            if self.loss_kernel == "triton":  # essnet_loss has no fused kernel ("auto" is fine)
                changed.append("method.loss_kernel = 'triton'")
            if changed:
                raise ConfigError(f"{', '.join(changed)} would be ignored by method.variant = 'essnet' (nearest "
                                  f"negatives, normalised embeddings, logits -20*|x-mu|, the torch loss); drop the key(s) or "
                                  f"set method.variant = 'paper'")

    @property
    def knn_chunk_bytes(self) -> int:
        return self.knn_chunk_mib * 2**20

    @property
    def loss_chunk_bytes(self) -> int:
        return self.loss_chunk_mib * 2**20

    @property
    def bounded_search(self) -> int:
        """knn_at = "feature_exact": the loss's and prediction's searches run at the decoder's stride
        and are proven exact per label pixel (`esskit.knn.bounded_neighbours`), keeping knn_bound_keys
        times k+1 classes per decoder pixel; 0 otherwise."""
        return self.knn_bound_keys if self.knn_at == "feature_exact" else 0

    def check_training(self) -> None:
        """Settings another one would silently ignore in training. Checked when a run trains, not on
        every load, so the config.toml of a run trained before these checks still evaluates."""
        if self.knn_bound_keys != MethodConfig.knn_bound_keys and self.knn_at != "feature_exact":
            raise ConfigError(f"method.knn_bound_keys = {self.knn_bound_keys} sizes the lists of knn_at = "
                              f"'feature_exact', not {self.knn_at!r}: drop it or set method.knn_at = 'feature_exact'")
        if self.negatives == "random" and (self.knn_at != "label" or self.knn_block > 1):
            raise ConfigError("method.knn_at / method.knn_block share the nearest-negative search; "
                              "method.negatives = 'random' searches nothing: drop them or use 'nearest'")
        # ess_full has no essnet form: its loss (Eq. 5, tau) and head would be the paper's, silently
        if self.name == "ess_full" and self.variant == "essnet":
            raise ConfigError("method.variant = 'essnet' would be ignored by method.name = 'ess_full' (the "
                              "exact softmax, logits -|x-mu|^2/tau, paper head); set method.variant = 'paper'")


@dataclass(kw_only=True)
class DataConfig:
    name: str = "synthetic"  # dataset loader (see `esskit.data.DATASETS`)
    root: str = ""  # dataset directory in the dataset's official layout
    num_classes: int = 19  # C; for synthetic any value 2..100000
    train_split: str = "train"  # the dataset's split names (VOC also "aug"; hf: any of the dataset's)
    val_split: str = "val"  # evaluated by `esskit evaluate` and at the end of training
    crop: list[int] = field(default_factory=lambda: [128, 128])  # training crop [H, W]
    # box an image is rescaled into (times a factor from scale_range), keeping its aspect ratio: its
    # long side fits max(base_size), its short side min(base_size) (mmseg's img_scale, either order)
    base_size: list[int] = field(default_factory=lambda: [128, 128])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale factors
    flip: bool = True  # random horizontal flip
    cat_max_ratio: float = 1.0  # < 1: redraw a crop (up to 10 times) where one class covers this share (mmseg: 0.75)
    photometric: bool = False  # mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 0  # DataLoader worker processes
    synthetic_train_size: int = 512  # synthetic: number of training images
    synthetic_val_size: int = 64  # synthetic: number of validation images
    synthetic_image_size: int = 128  # synthetic: image side in pixels
    sbd_root: str = ""  # voc split "aug": SBD benchmark_RELEASE/dataset folder ("" = <root>/../VOCaug/dataset)
    image_column: str = "image"  # hf: column holding the image
    mask_column: str = "label"  # hf: column holding the label mask (image or 2-D array)
    hf_config: str = ""  # hf: configuration name of a hub dataset (load_dataset's `name`)
    class_names: list[str] = field(default_factory=list)  # hf: class names in train-id order
    class_names_file: str = ""  # hf: text file with one class name per line (instead of class_names)
    mask_void_value: int = 255  # hf: stored mask value of void pixels, read as ignore (-1 = none)
    mask_label_offset: int = 0  # hf: subtracted from stored values (1 for ADE20k-style 0 = void masks)

    def __post_init__(self):
        if not 2 <= self.num_classes:
            raise ConfigError(f"data.num_classes = {self.num_classes} must be >= 2")
        if len(self.crop) != 2 or min(self.crop) <= 0:
            raise ConfigError(f"data.crop = {self.crop} must be [height, width] with positive sizes")
        if len(self.base_size) != 2 or min(self.base_size) <= 0:
            raise ConfigError(f"data.base_size = {self.base_size} must be two positive sizes (short and long side, "
                              f"either order)")
        low, high = self.scale_range if len(self.scale_range) == 2 else (0, 0)
        if not (0 < low <= high and math.isfinite(high)):  # NaN fails the comparisons too
            raise ConfigError(f"data.scale_range = {self.scale_range} must be [min, max] with 0 < min <= max "
                              f"(finite)")
        if not 0 < self.cat_max_ratio <= 1:  # NaN fails too
            raise ConfigError(f"data.cat_max_ratio = {self.cat_max_ratio} must be in (0, 1] (1 = off; mmseg uses 0.75)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("data.mean and data.std must have 3 values (RGB)")
        if not all(map(math.isfinite, self.mean)):
            raise ConfigError(f"data.mean = {self.mean} must hold 3 finite numbers")
        if not all(math.isfinite(v) and v > 0 for v in self.std):  # the normalisation divides by std
            raise ConfigError(f"data.std = {self.std} must hold 3 finite numbers > 0")
        if max(map(abs, self.mean)) > 1 or max(self.std) > 1:  # mmseg's img_norm_cfg is in 0-255 units
            raise ConfigError(f"data.mean = {self.mean}, data.std = {self.std}: images are scaled to [0, 1] before "
                              f"normalising, so give them in [0, 1] units (0-255 values / 255, e.g. ImageNet's "
                              f"[0.485, 0.456, 0.406] and [0.229, 0.224, 0.225])")
        _check_positive("data", self, ["num_workers"], allow_zero=True)
        _check_positive("data", self, ["synthetic_train_size", "synthetic_val_size"])
        if self.synthetic_image_size < SYNTHETIC_MIN_IMAGE_SIZE:
            raise ConfigError(f"data.synthetic_image_size = {self.synthetic_image_size} must be >= "
                              f"{SYNTHETIC_MIN_IMAGE_SIZE}")
        if self.class_names and self.class_names_file:
            raise ConfigError("data.class_names and data.class_names_file are exclusive; set one")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"data.class_names has {len(self.class_names)} names but data.num_classes = "
                              f"{self.num_classes}")
        if not -1 <= self.mask_void_value < 2**16:
            raise ConfigError(f"data.mask_void_value = {self.mask_void_value} must be -1 (none) or 0..65535")
        _check_positive("data", self, ["mask_label_offset"], allow_zero=True)
        # The hf loader reads the void value before the offset: one that a class is stored as (e.g. the
        # default 255 with more than 255 classes) would silently turn that class into ignore.
        stored = range(self.mask_label_offset, self.mask_label_offset + self.num_classes)
        if self.name == "hf" and self.mask_void_value in stored:
            raise ConfigError(f"data.mask_void_value = {self.mask_void_value} is the stored value of class "
                              f"{self.mask_void_value - self.mask_label_offset} (data.num_classes = "
                              f"{self.num_classes}, data.mask_label_offset = {self.mask_label_offset}); set it to "
                              f"the masks' real void value, or -1 if they have none")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 0.01  # base learning rate (1e-2 ADE20k/COCO, 1e-1 Cityscapes/VOC)
    momentum: float = 0.9  # SGD momentum of the segmentation network
    weight_decay: float = 1e-4  # on every parameter, as mmseg's default
    power: float = 0.9  # poly schedule: lr * (1 - step/steps) ** power
    backbone_lr_mult: float = 0.1  # backbone lr = mult * lr
    backbone_bn_momentum: float = 0.01  # BatchNorm running-stat momentum in the backbone
    embed_momentum: float = 0.95  # SGD momentum of the ESS class embeddings (paper §4)
    embed_power: float = 0.95  # poly power of the ESS class embeddings (paper §4)
    clip_grad_norm: float = 0.0  # clip the global gradient norm to this value; 0 = off
    warmup_steps: int = 0  # linear lr warm-up over the first steps, then poly (0 = none, as in the paper)

    def __post_init__(self):
        _check_positive("optim", self, ["lr", "power", "embed_power"])
        _check_positive("optim", self, ["momentum", "weight_decay", "backbone_lr_mult", "embed_momentum",
                                        "clip_grad_norm", "warmup_steps"],
                        allow_zero=True)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # images per device per step
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (the loss is always fp32)
    seed: int = 0  # weights, data order, augmentation and random negatives
    cpu: bool = False  # force the CPU even when a GPU is present
    sync_bn: bool = False  # SyncBatchNorm across processes (only when more than one process runs)
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in the run directory
    stop_after: int = 0  # stop with a checkpoint after this many steps in this invocation; 0 = never
    out_dir: str = "runs/synthetic"  # run directory (overridden by `--out`)

    def __post_init__(self):
        _check_choice("train", "mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check_positive("train", self, ["steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"])
        _check_positive("train", self, ["eval_every", "save_every", "stop_after"], allow_zero=True)
        if not 0 <= self.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
            raise ConfigError(f"train.seed = {self.seed} must be in 0 .. 2**32 - 1")


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 4  # images per evaluation batch (1 when images differ in size)
    max_images: int = 0  # evaluate only the first N validation images; 0 = all
    mode: str = "whole"  # "whole" image or "slide" (sliding windows, for Cityscapes-size images)
    crop: list[int] = field(default_factory=lambda: [512, 1024])  # slide: window [H, W]
    stride: list[int] = field(default_factory=lambda: [341, 682])  # slide: step [H, W]
    # mmseg's single-scale test: rescale each image into this box keeping its aspect ratio (as
    # data.base_size at ratio 1) before the model, score at the label's size; [] = the image's own size
    scale: list[int] = field(default_factory=list)

    def __post_init__(self):
        _check_choice("eval", "mode", self.mode, ("whole", "slide"))
        if self.scale and (len(self.scale) != 2 or min(self.scale) <= 0):
            raise ConfigError(f"eval.scale = {self.scale} must be [] or two positive sizes (short and long side)")
        for name in ("crop", "stride"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) <= 0:
                raise ConfigError(f"eval.{name} = {value} must be [height, width] with positive sizes")
        _check_positive("eval", self, ["batch_size"])
        _check_positive("eval", self, ["max_images"], allow_zero=True)
        # A step longer than the window skips pixels: no window predicts them.
        if self.mode == "slide" and any(s > c for s, c in zip(self.stride, self.crop)):
            raise ConfigError(f"eval.stride = {self.stride} must be <= eval.crop = {self.crop} in each dimension "
                              f"(mode 'slide')")


@dataclass(kw_only=True)
class ProfileConfig:
    """`esskit profile`'s grid, for recipes that carry their own; its options win over these."""
    classes: list[int] = field(default_factory=lambda: [19, 150, 182, 1284])  # class counts C: Figure 1's
    methods: list[str] = field(default_factory=lambda: ["baseline", "ess"])  # of baseline, ess, ess_full
    budget_gib: float = 12.0  # memory budget (the paper's 12 GB card)
    max_batch: int = 256  # the largest batch the max-batch search tries
    batch: int = 0  # > 0: no search, peak memory and times at this batch for every method
    device: str = ""  # "cuda" (measure), "meta" (estimate), "cpu" (estimate, times on the CPU); "": cuda if any
    # what the timed steps see: "noise" (Gaussian images, i.i.d. uniform labels) or "synthetic" (the
    # synthetic dataset's Voronoi images and region labels: the spatial structure of real data, which
    # knn_at = "feature_exact"'s bound and the fused Eq. 6 backward's atomics depend on). Memory: noise.
    inputs: str = "noise"

    def __post_init__(self):
        if not self.classes or min(self.classes) < 2:
            raise ConfigError(f"profile.classes = {self.classes} must be class counts >= 2, e.g. [19, 150, 1284]")
        if not self.methods:
            raise ConfigError(f"profile.methods is empty; name some of {', '.join(METHODS)}")
        for method in self.methods:
            _check_choice("profile", "methods", method, METHODS)
        _check_positive("profile", self, ["budget_gib", "max_batch"])
        _check_positive("profile", self, ["batch"], allow_zero=True)
        _check_choice("profile", "device", self.device, ("", *PROFILE_DEVICES))
        _check_choice("profile", "inputs", self.inputs, PROFILE_INPUTS)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self):
        if self.method.name == "ess" and self.method.k >= self.data.num_classes:  # ess_full has no k
            raise ConfigError(f"method.k = {self.method.k} must be < data.num_classes = {self.data.num_classes}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(where: str, value, annotation):
    """Check `value` against a field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} must be a list of {item_type.__name__}, e.g. [1, 2]")
        return [_coerce(where, v, item_type) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
        example = {int: "8", float: "0.01 or 1e-3", bool: "true or false"}.get(annotation)
        hint = f" (a TOML {annotation.__name__}, e.g. {example})" if isinstance(value, str) and example else ""
        raise ConfigError(f"{where} = {value!r} must be of type {annotation.__name__}{hint}")
    if annotation is str and not value.isascii():  # argv bytes that are not UTF-8 arrive as lone surrogates
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where} = {value!r} is not UTF-8 text: the run's config.toml (TOML is UTF-8) "
                              f"could not record it") from None
    return value


def _parse_override(text: str) -> tuple[str, str, str, object]:
    """section, key, the raw value text and its typed value; spaces around key and value are dropped."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key.count(".") != 1:
        raise ConfigError(f"--set {text!r}: key must be section.key, sections: {', '.join(SECTIONS)}")
    section, name = (part.strip() for part in key.split("."))
    try:  # TOML syntax gives typed values (1, 0.5, true, [1, 2]); anything else is a string
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, raw, value


def build_config(raw: dict, source: str = "<dict>") -> Config:
    """Validate a nested dict (as read from TOML) into a Config; errors name the key and `source`."""
    classes = _section_classes()
    sections = {}
    for section, values in raw.items():
        if section not in classes:
            raise ConfigError(f"{source}: unknown section [{section}]{_suggest(section, classes)}; "
                              f"sections: {', '.join(classes)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        hints = typing.get_type_hints(classes[section])
        kwargs = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{name}{_suggest(name, hints)}; "
                                  f"valid keys: {', '.join(hints)}")
            kwargs[name] = _coerce(f"{source}: {section}.{name}", value, hints[name])
        try:
            sections[section] = classes[section](**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        return Config(**sections)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = (), hidden: list[str] = ()) -> Config:
    """Read a TOML recipe (or defaults when `path` is None) and apply `section.key=value` overrides,
    then `hidden` ones (a command's own, which error messages do not list as the user's --set)."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            what = "is a directory, not a TOML file" if path.is_dir() else "not found"
            raise ConfigError(f"recipe {path} {what}; recipes live in recipes/*.toml")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML recipes are UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    classes = _section_classes()
    for text in [*overrides, *hidden]:
        section, name, literal, value = _parse_override(text)
        if section in classes and typing.get_type_hints(classes[section]).get(name) is str:
            value = value if isinstance(value, str) else literal  # data.val_split=2017
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):  # `method = 1` in the recipe: build_config's error, not a TypeError
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        table[name] = value
    if overrides:
        source += " with --set " + " ".join(overrides)
    return build_config(raw, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    import tomli_w  # here: only training writes a config (the GPU image runs the profiler without it)

    write_atomic(path, tomli_w.dumps(config_to_dict(cfg)))  # resume and predict read it back

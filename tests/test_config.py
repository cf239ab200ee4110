"""esskit.config: recipes, --set overrides, validation errors and the resolved-config round trip."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from esskit.config import Config, ConfigError, build_config, load_config, save_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

RECIPE = """
[model]
backbone = "mobilenetv2_100"
embed_dim = 7

[method]
name = "ess"
k = 4
tau = 0.1
negatives = "random"

[data]
num_classes = 21
crop = [64, 96]
scale_range = [0.75, 1.25]

[optim]
lr = 1  # an int for a float field

[train]
steps = 5
mixed_precision = "bf16"
"""


def _write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.method.k < cfg.data.num_classes
    assert cfg == build_config({})


def test_shipped_recipes_load():
    recipes = sorted(RECIPES.glob("*.toml"))
    assert recipes
    for path in recipes:
        assert isinstance(load_config(path), Config)


def test_recipe_loads_with_types(tmp_path):
    cfg = load_config(_write(tmp_path, RECIPE))
    assert cfg.model.backbone == "mobilenetv2_100" and cfg.model.embed_dim == 7
    assert cfg.method.k == 4 and cfg.method.tau == 0.1 and cfg.method.negatives == "random"
    assert cfg.data.num_classes == 21 and cfg.data.crop == [64, 96]
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.train.steps == 5 and cfg.train.mixed_precision == "bf16"
    # untouched fields keep their defaults
    assert cfg.optim.momentum == Config().optim.momentum
    assert cfg.eval == Config().eval


def test_set_overrides_are_typed_by_field(tmp_path):
    cfg = load_config(_write(tmp_path, RECIPE), [
        "train.steps=7",                 # int
        "method.tau=0.2",                # float
        "optim.momentum=0",              # int accepted for float
        "data.flip=false",               # bool
        "data.crop=[32, 48]",            # list[int]
        "data.scale_range=[1, 2.5]",     # ints accepted inside list[float]
        "model.backbone=resnet18",       # bare string
        'train.out_dir="runs/x y"',      # quoted string
        "data.root=/data/ade20k",        # path-like bare string
        "method.name=baseline",
    ])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.method.tau == 0.2
    assert cfg.optim.momentum == 0.0 and type(cfg.optim.momentum) is float
    assert cfg.data.flip is False
    assert cfg.data.crop == [32, 48]
    assert cfg.data.scale_range == [1.0, 2.5] and all(type(v) is float for v in cfg.data.scale_range)
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.out_dir == "runs/x y"
    assert cfg.data.root == "/data/ade20k"
    assert cfg.method.name == "baseline"
    # override without a recipe
    assert load_config(None, ["data.num_classes=150", "method.k=10"]).data.num_classes == 150


@pytest.mark.parametrize("field", ["data.root", "data.class_names_file"])
def test_string_that_config_toml_cannot_hold_is_refused(field):
    # A shell argument with a byte that is not UTF-8 ($'\xff') reaches Python as a lone surrogate;
    # TOML cannot write it, and save_config raised UnicodeEncodeError (a traceback) after the model was built.
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [f"{field}=/data/caf\udcff"])
    assert load_config(None, [f"{field}=/data/caf\u00e9"])  # non-ASCII UTF-8 text is fine


def test_set_numeric_looking_value_for_string_field_stays_a_string():
    # "typed by the field": a str field given 2017 gets the string "2017", not a type error.
    cfg = load_config(None, ["data.val_split=2017"])
    assert cfg.data.val_split == "2017"


@pytest.mark.parametrize("override, needles", [
    ("train.steps=1.5", ["train.steps", "int"]),
    ("train.steps=true", ["train.steps", "int"]),          # bool is not an int
    ("method.tau=yes", ["method.tau", "float"]),
    ("data.flip=1", ["data.flip", "bool"]),
    ("data.crop=64", ["data.crop", "list"]),
    ('data.crop=[64, "a"]', ["data.crop"]),
])
def test_wrong_type_raises_naming_key(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("override, needle", [
    ("model.norm=ln", "model.norm"),
    ("method.negatives=farthest", "method.negatives"),
    ("method.knn=annoy", "method.knn"),
    ("method.variant=x", "method.variant"),
    ("method.name=knn", "method.name"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("method.k=0", "method.k"),
    ("method.tau=-1", "method.tau"),
    ("data.num_classes=1", "data.num_classes"),
    ("data.crop=[64]", "data.crop"),
    ("train.seed=-1", "train.seed"),  # numpy's seed range, before accelerate's set_seed tracebacks
    ("train.seed=4294967296", "train.seed"),
])
def test_invalid_value_raises_naming_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("recipe, names, override, pattern", [
    ("[modle]\nbackbone = 'resnet18'\n", ["modle", "did you mean 'model'"], "methd.k=3", "did you mean 'method'"),
    ("[method]\nmargn = 0.3\n", ["method.margn", "did you mean 'margin'"], "train.step=3",
     r"train\.step.*did you mean 'steps'"),
])
def test_unknown_section_or_key_suggests(tmp_path, recipe, names, override, pattern):
    path = _write(tmp_path, recipe)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert all(name in str(err.value) for name in [*names, str(path)])
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="steps"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["steps=3"])


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(path)


def test_invalid_toml_names_file(tmp_path):
    path = _write(tmp_path, "[model\nbackbone = resnet18\n", "broken.toml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "broken.toml" in str(err.value) and "TOML" in str(err.value)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[train]\nsteps = 4 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 23\)"):
        load_config(latin1)


def test_section_not_a_table(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load_config(_write(tmp_path, "model = 3\n"))


def test_k_must_be_below_num_classes(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.k"):
        load_config(None, ["data.num_classes=5", "method.k=5"])
    with pytest.raises(ConfigError, match=r"method\.k"):
        load_config(_write(tmp_path, "[method]\nk = 30\n[data]\nnum_classes = 10\n"))
    assert load_config(None, ["data.num_classes=5", "method.k=4"]).method.k == 4


@pytest.mark.parametrize("overrides", [[], ["method.name=baseline", "optim.lr=2", "data.crop=[33, 65]",
                                            "data.root=/x/y", "train.cpu=true", "method.margin_weight=0"]])
def test_save_config_round_trip(tmp_path, overrides):
    cfg = load_config(_write(tmp_path, RECIPE), overrides)
    out = tmp_path / "run" / "config.toml"
    out.parent.mkdir()
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    # the resolved file is a complete recipe: every field of every section is written
    raw = tomllib.loads(out.read_text())
    for section in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
        assert set(raw[section.name]) == names


def test_accuracy_study_applies_every_ablation_recipe_to_the_synthetic_data():
    """profiling/accuracy_study.py turns each recipes/ablations/*.toml into --set overrides of the
    synthetic recipe: every one must load, keep its switches and stay on synthetic data."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("accuracy_study", root / "profiling" / "accuracy_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = study.method_rows() + study.ablation_rows()
    assert len({name for _, name, _ in rows}) == len(rows) == 11 + 11 + 4
    for _, name, keys in rows:
        cfg = study.row_config(keys)
        method = "baseline" if "baseline" in name else "ess_full" if "ess_full" in name else "ess"
        assert cfg.data.name == "synthetic" and cfg.data.crop == [64, 64] and cfg.method.name == method, name
        schedule = (0.01, 0) if method == "baseline" else (0.002, 100)
        assert (cfg.optim.lr, cfg.optim.warmup_steps) == schedule, name
    schedules = {name: study.row_config(keys).optim for _, name, keys in study.schedule_rows()}
    assert (schedules["ess_lr3e-4_warmup0"].lr, schedules["ess_lr3e-4_warmup0"].warmup_steps) == (3e-4, 0)
    assert (schedules["baseline_lr1e-2_warmup100"].lr, schedules["baseline_lr1e-2_warmup100"].warmup_steps) == (0.01, 100)
    random = load_config(study.RECIPE, dict((n, k) for _, n, k in rows)["table3_random"])
    assert random.method.negatives == "random" and random.method.normalize is False
    assert random.method.margin_weight == 0.0 and random.train.batch_size == 10
    figure4 = {name: study.row_config(keys) for _, name, keys in study.figure4_rows()}
    assert not set(figure4) & {name for _, name, _ in rows + study.schedule_rows()}
    assert [(c.data.num_classes, c.model.embed_dim, c.train.seed) for c in figure4.values()] == [
        (19, 4, 0), (19, 12, 0), (19, 16, 0), (19, 32, 0), (19, 64, 0), (19, 12, 1), (19, 16, 1), (19, 32, 1), (19, 64, 1),
        (150, 32, 0), (1284, 32, 0), (150, 32, 1), (19, 32, 0), (150, 32, 0)]
    assert figure4["c1284_ess_d32"].method.k == 8 and figure4["c19_ess_d4"].method.name == "ess"
    assert figure4["c150_ess_full_d32"].method.name == "ess_full"
    knobs = {name: study.row_config(keys) for _, name, keys in study.knob_rows()}
    assert knobs["c19_ess_tau0.1"].method.tau == 0.1 and knobs["c19_ess_backbone_lr_x5"].optim.backbone_lr_mult == 5
    assert {c.model.embed_dim for c in knobs.values()} == {7}
    convergence = {name: study.row_config(keys) for _, name, keys in study.convergence_rows()}
    assert [(c.method.k, c.method.negatives, c.train.eval_every) for c in convergence.values()] == [
        (7, "nearest", 25), (7, "random", 25)]
    every = rows + study.schedule_rows() + study.figure4_rows() + study.knob_rows() + study.convergence_rows()
    assert len({name for _, name, _ in every}) == len(every)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=nan", "optim.lr"),
    ("method.tau=nan", "method.tau"),
    ("method.margin=nan", "method.margin"),          # allow_zero fields too
    ("optim.clip_grad_norm=inf", "optim.clip_grad_norm"),
    ("data.scale_range=[0.5, inf]", "data.scale_range"),
    ("data.mean=[0.5, nan, 0.5]", "data.mean"),
    ("data.std=[0, 1, 1]", "data.std"),               # the normalisation would divide by zero
    ("data.std=[-0.2, 1, 1]", "data.std"),
    ("data.std=[nan, 1, 1]", "data.std"),
    ("data.mean=[123.675, 116.28, 103.53]", "0-255 values / 255"),  # mmseg's img_norm_cfg: 0-255 units
    ("data.std=[58.395, 57.12, 57.375]", "0-255 values / 255"),
    ("data.synthetic_image_size=4", "data.synthetic_image_size"),
])
def test_non_finite_and_unusable_numbers_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_synthetic_image_size_bound_is_the_dataset_s():
    from esskit.config import SYNTHETIC_MIN_IMAGE_SIZE
    from esskit.data.synthetic import SyntheticSegmentation

    size = SYNTHETIC_MIN_IMAGE_SIZE
    assert load_config(None, [f"data.synthetic_image_size={size}"]).data.synthetic_image_size == size
    assert SyntheticSegmentation(3, 1, image_size=size)[0][0].shape == (3, size, size)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSegmentation(3, 1, image_size=size - 1)


def test_slide_stride_must_not_exceed_crop():
    with pytest.raises(ConfigError, match=r"eval\.stride = \[341, 1025\] must be <= eval\.crop"):
        load_config(None, ["eval.mode=slide", "eval.stride=[341, 1025]"])
    with pytest.raises(ConfigError, match=r"eval\.stride"):
        load_config(None, ["eval.mode=slide", "eval.crop=[64, 64]", "eval.stride=[65, 32]"])
    cfg = load_config(None, ["eval.mode=slide", "eval.crop=[64, 64]", "eval.stride=[64, 32]"])
    assert cfg.eval.stride == [64, 32]
    assert load_config(None, ["eval.stride=[600, 600]"]).eval.mode == "whole"  # unused outside slide


def test_set_strips_spaces_around_key_and_value():
    cfg = load_config(None, ["data.root= /x", "method.name = ess_full", " train.steps =7 ", "data.val_split= 2017",
                             'train.out_dir=" runs/a "'])
    assert cfg.data.root == "/x" and cfg.method.name == "ess_full" and cfg.train.steps == 7
    assert cfg.data.val_split == "2017"
    assert cfg.train.out_dir == " runs/a "  # a quoted TOML string keeps what the quotes hold


@pytest.mark.parametrize("override, needle", [
    ("method.negatives=random", r"method\.negatives = 'random'"),
    ("method.normalize=false", r"method\.normalize = False"),
    ("method.tau=0.1", r"method\.tau = 0\.1"),
    ("method.loss_kernel=triton", r"method\.loss_kernel = 'triton'"),  # essnet_loss has no fused kernel
])
def test_essnet_refuses_settings_it_ignores(override, needle):
    with pytest.raises(ConfigError, match=needle + ".*essnet") as err:
        load_config(None, ["method.variant=essnet", override])
    assert "\n" not in str(err.value)
    load_config(None, ["method.variant=paper", override])  # the paper variant uses them
    # ess_full (exact softmax) uses tau and normalize whatever the variant; baseline uses none of them
    assert load_config(None, ["method.name=ess_full", "method.tau=0.1"]).method.tau == 0.1
    assert load_config(None, ["method.variant=essnet", "method.tau=0.05"]).method.variant == "essnet"


@pytest.mark.parametrize("sets, needle", [
    (["method.name=ess_full", "method.variant=essnet"], r"variant = 'essnet' would be ignored by method\.name = 'ess_full'"),
    (["method.negatives=random", "method.knn_block=2"], r"negatives = 'random' searches nothing"),
    (["method.negatives=random", "method.knn_at=feature"], r"negatives = 'random' searches nothing"),
])
def test_keys_another_setting_ignores_are_refused_for_training(sets, needle):
    cfg = load_config(None, sets)  # loads: the config.toml of a run trained before the check still evaluates
    with pytest.raises(ConfigError, match=needle):
        cfg.method.check_training()
    load_config(None, ["method.name=ess_full", "method.negatives=random"]).method.check_training()  # each alone
    load_config(None, ["method.knn_block=2"]).method.check_training()


def test_hf_void_value_inside_the_class_range_is_refused():
    many = ["data.name=hf", "data.num_classes=300"]
    with pytest.raises(ConfigError, match=r"data\.mask_void_value = 255 is the stored value of class 255"):
        load_config(None, many)
    with pytest.raises(ConfigError, match=r"class 254 .*data\.mask_label_offset = 1"):
        load_config(None, [*many, "data.mask_label_offset=1"])
    for ok in ("data.mask_void_value=-1", "data.mask_void_value=300", "data.mask_void_value=65535"):
        assert load_config(None, [*many, ok]).data.num_classes == 300
    ade = load_config(None, [*many, "data.mask_void_value=0", "data.mask_label_offset=1"])  # 0 = void, v -> v-1
    assert ade.data.mask_void_value == 0
    assert load_config(None, ["data.name=hf", "data.num_classes=150"]).data.mask_void_value == 255
    # only the hf loader reads mask_void_value: the other datasets keep the default
    assert load_config(None, ["data.name=coco_lvis", "data.num_classes=1284"]).data.mask_void_value == 255


def test_save_config_is_atomic(tmp_path, monkeypatch):
    """config.toml is read back by --resume and predict: an interrupted save keeps the old file."""
    import esskit.config

    written = []
    monkeypatch.setattr(esskit.config, "write_atomic", lambda path, text: written.append((Path(path), text)))
    save_config(Config(), tmp_path / "config.toml")
    assert [p for p, _ in written] == [tmp_path / "config.toml"] and not (tmp_path / "config.toml").exists()
    assert build_config(tomllib.loads(written[0][1])) == Config()


def test_set_into_a_section_that_is_not_a_table_is_a_config_error(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("method = 1\n")
    with pytest.raises(ConfigError, match=r"\[method\] must be a table"):
        load_config(recipe, ["method.k=3"])

"""Parameter groups and learning-rate schedules of esskit.optim against the paper's §4 settings,
computed by hand."""

import pytest
import torch
import torch.nn as nn

from esskit.config import Config, load_config
from esskit.errors import ConfigError
from esskit.optim import build_optimizer, build_scheduler


class TinyEss(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.decoder = nn.Linear(2, 2)
        self.class_embeddings = nn.Parameter(torch.randn(5, 2))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


def config(**optim) -> Config:
    return load_config(None, [f"optim.{k}={v}" for k, v in optim.items()])


def same(params, expected) -> bool:
    return len(params) == len(expected) and all(p is e for p, e in zip(params, expected))


def test_param_groups_follow_the_paper():
    model = TinyEss()
    optimizer = build_optimizer(model, config(lr=0.01, backbone_lr_mult=0.1, momentum=0.9, embed_momentum=0.95))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert same(groups["backbone"]["params"], [model.backbone.weight, model.backbone.bias])
    assert groups["backbone"]["lr"] == pytest.approx(0.001) and groups["backbone"]["momentum"] == 0.9
    assert same(groups["head"]["params"], [model.decoder.weight, model.decoder.bias]) and groups["head"]["lr"] == 0.01
    assert same(groups["class_embeddings"]["params"], [model.class_embeddings])
    assert groups["class_embeddings"]["momentum"] == 0.95 and groups["class_embeddings"]["power"] == 0.95
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    assert not any(p is model.frozen for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("warmup", [0, 4])
def test_poly_schedule_with_linear_warmup(warmup):
    model = TinyEss()
    optimizer = build_optimizer(model, config(lr=0.1, power=0.9, embed_power=0.95, backbone_lr_mult=0.5))
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=warmup)
    for step in range(10):
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        expected = {"backbone": 0.05 * (1 - step / 10) ** 0.9, "head": 0.1 * (1 - step / 10) ** 0.9,
                    "class_embeddings": 0.1 * (1 - step / 10) ** 0.95}
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected[group["name"]] * ramp), (step, group["name"])
        optimizer.step()
        scheduler.step()
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)


def test_negative_warmup_is_rejected():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps = -1 must be >= 0"):
        config(warmup_steps=-1)


def test_schedule_does_not_advance_on_skipped_optimizer_steps(tmp_path, monkeypatch):
    # fp16's GradScaler skips the steps whose gradients overflow (on a GPU, the first few): the
    # schedule must follow the updates made, as in transformers' Trainer. Here every step is skipped.
    import json
    from pathlib import Path

    from accelerate import Accelerator
    from typer.testing import CliRunner

    from esskit.cli import app

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"
    tiny = ["train.steps=3", "train.batch_size=2", "data.crop=[32,32]", "data.base_size=[32,32]",
            "data.synthetic_image_size=32", "data.synthetic_train_size=4", "data.synthetic_val_size=2",
            "train.log_every=1", "eval.batch_size=2", "optim.warmup_steps=3"]
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"),
                                      *[a for s in tiny for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    assert len(lrs) == 3 and lrs[0] == lrs[1] == lrs[2] == pytest.approx(0.002 / 3)  # warm-up's first value

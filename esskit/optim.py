"""SGD with the paper's parameter groups and per-group poly learning-rate schedules (paper §4)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from esskit.config import Config


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Backbone at lr x 0.1; ESS class embeddings with momentum 0.95 and poly power 0.95;
    everything else (ASPP, decoder, head) at the base lr with momentum and power 0.9."""
    backbone, embeddings, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(p)
        elif name.endswith("class_embeddings"):
            embeddings.append(p)
        else:
            rest.append(p)
    params = {"backbone": backbone, "head": rest, "class_embeddings": embeddings}
    return [{"name": name, "params": params[name], **values} for name, values in group_settings(cfg).items()
            if params[name]]


def group_settings(cfg: Config) -> dict[str, dict]:
    """Each parameter group's base lr, momentum, weight decay and poly power, from the recipe."""
    o = cfg.optim
    return {"backbone": {"lr": o.lr * o.backbone_lr_mult, "momentum": o.momentum, "power": o.power},
            "head": {"lr": o.lr, "momentum": o.momentum, "power": o.power},
            "class_embeddings": {"lr": o.lr, "momentum": o.embed_momentum, "power": o.embed_power}}


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """lr = base_lr * (1 - step / total_steps) ** power, power taken from each param group, times a
    linear ramp (step + 1) / warmup_steps over the first warmup_steps steps."""
    def poly(power: float):
        return lambda step: max(0.0, 1.0 - step / total_steps) ** power * min(1.0, (step + 1) / max(1, warmup_steps))
    return LambdaLR(optimizer, [poly(g["power"]) for g in optimizer.param_groups])


def resume_schedule(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: Config) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded: apply the recipe's optim values
    (a resume may change them, and config.toml records the new ones) and its schedule (train.steps,
    warmup_steps: the scheduler's lambdas are this run's) at the restored step. Unchanged values give
    the saved ones bit for bit."""
    settings = group_settings(cfg)
    for group in optimizer.param_groups:
        values = settings[group["name"]]
        group.update(initial_lr=values["lr"], momentum=values["momentum"], power=values["power"],
                     weight_decay=cfg.optim.weight_decay)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

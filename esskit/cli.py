"""The `esskit` command line (Typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from esskit.config import load_config
from esskit.errors import EsskitError

app = typer.Typer(help="ESS: semantic segmentation with thousands of classes on one GPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

Recipe = Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/synthetic.toml")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value")]


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command()
def train(recipe: Recipe, overrides: Overrides = None,
          out: Annotated[Optional[Path], typer.Option(help="Run directory (default: train.out_dir)")] = None,
          resume: Annotated[Optional[Path], typer.Option(help="Continue the newest checkpoint of this run directory")] = None):
    """Train a model from a recipe; leaves config.toml, metrics.jsonl, checkpoints and eval.json."""
    from esskit import engine

    try:
        cfg = load_config(recipe, overrides or [])
        run_dir = resume or out or Path(cfg.train.out_dir)
        engine.train(cfg, run_dir, resume=resume is not None)
    except EsskitError as e:
        _fail(e)


@app.command()
def evaluate(recipe: Recipe,
             checkpoint: Annotated[Path, typer.Option(help="Run directory or checkpoint directory")],
             overrides: Overrides = None):
    """Evaluate a checkpoint on the recipe's validation split; writes eval.json in the run directory."""
    from esskit import engine

    try:
        engine.evaluate_checkpoint(load_config(recipe, overrides or []), checkpoint)
    except EsskitError as e:
        _fail(e)


def main() -> None:
    app()

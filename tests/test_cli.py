"""`esskit train` option checks that run before any model is built."""

from pathlib import Path

from typer.testing import CliRunner

from esskit.cli import app

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"


def test_resume_with_another_out_is_refused(tmp_path, monkeypatch):
    import esskit.engine

    runs = []
    monkeypatch.setattr(esskit.engine, "train", lambda cfg, run_dir, resume: runs.append((Path(run_dir), resume)))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(RECIPE), "--resume", str(run), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and not runs
    assert "--resume" in result.output and "drop --out" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # the same directory, however spelled, is what --resume writes into anyway
    same = CliRunner().invoke(app, ["train", str(RECIPE), "--resume", str(run), "--out", f"{tmp_path}/./run/"])
    assert same.exit_code == 0, same.output
    assert runs == [(run, True)]

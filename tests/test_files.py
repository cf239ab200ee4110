"""esskit.files: the new text, CSV or figure replaces the old whole, and a failed write leaves the old file
and no temporary behind."""

import pytest

from esskit.files import save_figure_atomic, write_atomic, write_csv_atomic


def test_write_atomic_replaces_whole_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    write_atomic(target, "old")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("esskit.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "half")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_csv_and_figure_writes_are_whole_or_untouched(tmp_path, monkeypatch):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = tmp_path / "results.csv"
    write_csv_atomic(target, ["a", "b"], [{"a": 1, "b": "x,y", "extra": 0}])
    assert list(csv.DictReader(target.open())) == [{"a": "1", "b": "x,y"}]
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure_atomic(fig, tmp_path / "figure1.png")
    assert (tmp_path / "figure1.png").read_bytes()[:4] == b"\x89PNG"

    def killed(*args, **kwargs):  # a time box's SIGTERM arriving inside savefig
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        save_figure_atomic(fig, tmp_path / "figure1.png")
    plt.close(fig)
    assert (tmp_path / "figure1.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure1.png", "results.csv"]


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import esskit.files as files

    write_atomic(tmp_path / "eval.json", "{}")
    with open(tmp_path / "plain", "w"):  # what open() gives, the umask applied
        pass
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert files.new_file_mode() == 0o666 & ~files._UMASK

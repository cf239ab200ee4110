"""esskit.files.write_atomic: the new text replaces the old whole, and a failed write leaves the old file
and no temporary behind."""

import pytest

from esskit.files import write_atomic


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

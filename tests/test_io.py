"""Atomic writes: a failed write leaves the previous file intact and no temp file behind."""
import pytest

from dsel.errors import DselError
from dsel.io import atomic_path, read_json, write_json


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_json_round_trip_and_errors(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DselError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(DselError, match="missing.json: JSON file not found"):
        read_json(tmp_path / "missing.json")

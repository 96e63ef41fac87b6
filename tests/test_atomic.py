"""Atomic writes: readers see the old file or the new one, never half of one."""

import os

import pytest

from jfacerec.core.atomic import atomic_open

def test_atomic_writes_leave_the_old_file_whole_on_failure(tmp_path):
    path = tmp_path / "result.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["result.csv"]

"""Atomic writes: nothing partial is ever visible, and temp files of killed writers do not pile up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cq.io import atomic_path, remove_stale_temps


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.cq"
    # a writer that dies without cleaning up (SIGKILL skips every finally)
    code = (
        "import os, sys; from cq.io import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    stale = list(tmp_path.glob(".model.cq.*.tmp"))
    assert len(stale) == 1 and not target.exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert list(tmp_path.glob(".*.tmp")) == []


def test_live_writers_temp_files_are_kept(tmp_path):
    target = tmp_path / "model.cq"
    mine = tmp_path / f".model.cq.{os.getpid()}.abcd1234.tmp"  # this process is alive
    mine.write_bytes(b"in progress")
    other = tmp_path / ".other.cq.1.abcd1234.tmp"  # another target: never touched
    other.write_bytes(b"x")
    assert remove_stale_temps(target) == []
    assert mine.exists() and other.exists()


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.cq"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []

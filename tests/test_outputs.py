"""Output files: atomic writes that never clobber special files or inputs, and one writer per output."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from safetensors import SafetensorError

from alvts_calib.errors import AlvtsError
from alvts_calib.outputs import atomic_write, check_output, input_files, lock_path, output_lock


def _write(text: str):
    return lambda temporary: Path(temporary).write_text(text)


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write(target, _write("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_link_is_written_through_and_kept(tmp_path):
    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    real.write_text("old")
    link.symlink_to(real.name)
    atomic_write(link, _write("new"))
    assert link.is_symlink() and real.read_text() == "new"


def test_special_files_and_directories_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(AlvtsError, match="pipe is a special file") as error:
        atomic_write(fifo, _write("x"))
    assert stat.S_ISFIFO(fifo.stat().st_mode) and "\n" not in str(error.value)
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    with pytest.raises(AlvtsError, match="special file"):
        atomic_write(link, _write("x"))
    with pytest.raises(AlvtsError, match="is a directory"):
        atomic_write(tmp_path, _write("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to-pipe"]


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.txt", _write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o604)
    atomic_write(kept, _write("y"))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     SafetensorError("Error while serializing: I/O error: (os error 28)")])
def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, failure):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fill_the_disk(temporary: str) -> None:
        Path(temporary).write_text("partial")
        raise failure

    with pytest.raises(AlvtsError, match=r"could not write .*out.txt \(no space left on device\)") as error:
        atomic_write(target, fill_the_disk)
    assert "\n" not in str(error.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_output_that_is_an_input_is_refused_also_through_links(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}")
    hard, soft = tmp_path / "hard.jsonl", tmp_path / "soft.jsonl"
    os.link(data, hard)
    soft.symlink_to(data)
    for output in (data, hard, soft):
        with pytest.raises(AlvtsError, match="writing it would destroy the input"):
            check_output(output, [data])
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_text("weights")
    with pytest.raises(AlvtsError, match="is the input"):
        check_output(folder / "model.safetensors", input_files([folder, None]))
    assert check_output(tmp_path / "new.safetensors", [data]) == (tmp_path / "new.safetensors").resolve()
    assert data.read_text() == "{}"


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "calib.safetensors"
    with output_lock(out, "alvts calibrate --seed 0"):
        first = r"being written by another alvts run \(pid \d+: alvts calibrate --seed 0\)"
        with pytest.raises(AlvtsError, match=first):
            with output_lock(out, "alvts calibrate --seed 1"):
                pass
        link = tmp_path / "link.safetensors"
        link.symlink_to(out.name)
        with pytest.raises(AlvtsError, match="another alvts run"):  # the same output through a link
            with output_lock(link):
                pass
    assert not lock_path(out).exists()
    with output_lock(out):  # free again
        pass


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "calib.safetensors"
    lock_path(out).write_text("pid 999999: a run that was killed")
    with output_lock(out, "alvts calibrate"):
        assert lock_path(out).read_text().endswith("alvts calibrate")
    assert not lock_path(out).exists()

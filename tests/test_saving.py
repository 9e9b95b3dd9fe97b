"""A write that fails (a full disk) leaves the previous file as it was, no temporary file, and ends an entry
script with one ``error:`` line naming the file and the cause, exit code 4, no traceback."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

import run_pre
from trainer.checkpoint import save_checkpoint
from trainer.runs import RunFolder
from utils import JsonlLog, SaveError, save_json, save_npz
from utils.cli import EXIT_CANNOT_SAVE

NO_SPACE = "No space left on device"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written_then_full(obj, f, *args, **kwargs):
    """``torch.save`` on a disk that fills up after the first bytes."""
    f.write(b"PK\x03\x04 half a checkpoint")
    disk_full()


WRITERS = {
    "checkpoint": ("w.pth", lambda path, v: save_checkpoint(path, {"w": torch.full((3,), float(v))}, epoch=v)),
    "json": ("result.json", lambda path, v: save_json(path, {"version": v})),
    "npz": ("feat.npz", lambda path, v: save_npz(path, features=np.full((4, 2), v, np.float32))),
    "jsonl": ("log.jsonl", lambda path, v: JsonlLog(path).append({"epoch": v})),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_keeps_the_previous_file(writer, tmp_path, monkeypatch):
    name, write = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    before = path.read_bytes()
    monkeypatch.setattr("utils.io.os.fsync", disk_full)  # the data reach the disk at the latest here
    with pytest.raises(SaveError) as failure:
        write(path, 2)
    assert str(failure.value).startswith(f"cannot write {path}: {NO_SPACE};")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]  # the temporary file is gone


def test_a_checkpoint_cut_short_by_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"w": torch.zeros(3)}, epoch=1)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_written_then_full)
    with pytest.raises(SaveError, match=NO_SPACE):
        save_checkpoint(path, {"w": torch.ones(3)}, epoch=2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_run_folder_that_cannot_be_created_raises_save_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SaveError, match=f"cannot write {tmp_path / 'file' / 'run'}"):
        RunFolder(tmp_path / "file" / "run", {"seed": 0})


@pytest.mark.slow
def test_pretraining_on_a_full_disk_stops_with_one_error_line(tiny_image_root, tmp_path, monkeypatch, capsys):
    """Epoch 1 is saved; the disk is full when epoch 2 saves: exit 4, one error line, epoch 1's last.pth kept."""
    run_dir = tmp_path / "run"
    flags = ["--data_root", str(tiny_image_root), "--run_dir", str(run_dir), "--device", "cpu",
             "--model_type", "conv4", "--pre_batch_size", "2", "--max_train_batches", "1", "--way", "2",
             "--shot", "1", "--val_query", "1", "--val_episodes", "3", "--num_workers", "0"]
    run_pre.main([*flags, "--pre_max_epoch", "1"])
    before = (run_dir / "last.pth").read_bytes()
    log_before = (run_dir / "log.jsonl").read_text()
    capsys.readouterr()

    monkeypatch.setattr(torch, "save", half_written_then_full)
    with pytest.raises(SystemExit) as exit_:
        run_pre.main([*flags, "--pre_max_epoch", "2", "--resume"])
    assert exit_.value.code == EXIT_CANNOT_SAVE == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: cannot write {run_dir}{os.sep}") and f".pth: {NO_SPACE};" in line
    assert (run_dir / "last.pth").read_bytes() == before
    assert (run_dir / "log.jsonl").read_text() == log_before
    assert not list(run_dir.glob(".*.tmp"))

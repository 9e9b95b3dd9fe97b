"""The one checkpoint loader/saver: formats, prefixes, key checks, safety, atomicity."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from models import build_backbone
from trainer.checkpoint import load_checkpoint, load_weights, save_checkpoint, strip_prefixes
from utils import InputError, SaveError


def small_net():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_round_trip_keeps_metadata(tmp_path):
    net = small_net()
    save_checkpoint(tmp_path / "a.pth", net.state_dict(), kind="backbone", epoch=3, config={"lr": 0.1})
    other = small_net()
    ckpt = load_weights(other, tmp_path / "a.pth", kind="backbone")
    assert ckpt["epoch"] == 3 and ckpt["config"] == {"lr": 0.1}
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temp file left behind


@pytest.mark.parametrize("wrap", ["params", "state_dict", "bare"])
@pytest.mark.parametrize("prefix", ["", "module.", "encoder.", "module._orig_mod.", "_orig_mod.module."])
def test_accepted_formats_and_prefixes(tmp_path, wrap, prefix):
    net = small_net()
    sd = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save({"params": sd} if wrap == "params" else {"state_dict": sd} if wrap == "state_dict" else sd,
               tmp_path / "c.pth")
    other = small_net()
    load_weights(other, tmp_path / "c.pth")
    assert torch.equal(other[0].weight, net[0].weight)


def test_original_pretraining_checkpoint_keeps_only_the_encoder():
    sd = {"encoder.layer.weight": torch.zeros(1), "pre_fc.weight": torch.zeros(1)}
    assert list(strip_prefixes(sd)) == ["layer.weight"]


def test_checkpoint_for_another_architecture_lists_the_differences(tmp_path):
    save_checkpoint(tmp_path / "wrn.pth", build_backbone("wrn28").state_dict(), kind="backbone")
    with pytest.raises(InputError) as err:
        load_weights(build_backbone("res12"), tmp_path / "wrn.pth")
    message = str(err.value)
    assert "wrn.pth" in message and "missing: layer1.0.conv3.weight" in message
    assert "unexpected: conv1.weight" in message and "more" in message


def test_shape_mismatch_is_reported(tmp_path):
    save_checkpoint(tmp_path / "s.pth", nn.Linear(4, 5).state_dict())
    with pytest.raises(InputError, match=r"weight \(5, 4\) vs \(3, 4\)"):
        load_weights(nn.Linear(4, 3), tmp_path / "s.pth")


def test_wrong_kind_is_refused(tmp_path):
    save_checkpoint(tmp_path / "b.pth", small_net().state_dict(), kind="backbone")
    with pytest.raises(InputError, match="backbone checkpoint, but a meta checkpoint is needed"):
        load_weights(small_net(), tmp_path / "b.pth", kind="meta")


class Payload:
    """Unpickling this would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"params": small_net().state_dict(), "extra": Payload()}, path)
    with pytest.raises(InputError, match="refused: the checkpoint carries pickled Python objects"):
        load_checkpoint(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "t.pth"
    save_checkpoint(path, small_net().state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "k.pth"
    save_checkpoint(path, small_net().state_dict(), epoch=1)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SaveError, match=f"cannot write {path}: disk full"):
        save_checkpoint(path, small_net().state_dict(), epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["k.pth"]


def test_map_location(tmp_path):
    save_checkpoint(tmp_path / "m.pth", small_net().state_dict())
    ckpt = load_checkpoint(tmp_path / "m.pth", map_location="cpu")
    assert all(v.device.type == "cpu" for v in ckpt["params"].values())

"""The one checkpoint loader/saver: formats, prefixes, key checks, safety, atomicity."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_backbone
from models.heads import HeadConfig, TasNet
from synthetic_data import release_meta_params, release_state_dict_keys
from trainer.checkpoint import load_checkpoint, load_weights, save_checkpoint, strip_prefixes
from utils import InputError


def small_net():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_round_trip_keeps_weights_and_metadata(tmp_path):
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
def test_weights_load_from_every_wrapper_and_prefix(tmp_path, wrap, prefix):
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


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
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


def test_truncated_or_missing_checkpoint_is_refused(tmp_path):
    path = tmp_path / "t.pth"
    save_checkpoint(path, small_net().state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")


@pytest.mark.parametrize("model_type", ["res12", "wrn28"])
def test_release_pretraining_checkpoint_loads_as_init_weights(tmp_path, reference_dir, model_type):
    """The release's pretraining saves ``{'params': encoder.* + pre_fc.0.*}``: the backbone part loads."""
    shapes = release_state_dict_keys(reference_dir / f"{model_type}_state_dict.txt")
    g = torch.Generator().manual_seed(0)
    params = {f"encoder.{k}": torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in shapes.items()}
    params.update({"pre_fc.0.weight": torch.randn(64, 640, generator=g), "pre_fc.0.bias": torch.zeros(64)})
    torch.save({"params": params}, tmp_path / "max_acc.pth")
    backbone = build_backbone(model_type)
    load_weights(backbone, tmp_path / "max_acc.pth", kind="backbone")
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, params[f"encoder.{key}"]), key


def release_meta_file(path: Path, reference_dir: Path, dim: int = 300) -> dict:
    g = torch.Generator().manual_seed(1)
    feat = {"weight": torch.randn(dim, 640, generator=g), "bias": torch.randn(dim, generator=g)}
    word = {"weight": torch.randn(dim, 640, generator=g), "bias": torch.randn(dim, generator=g)}
    params = release_meta_params(feat, word, release_state_dict_keys(reference_dir / "res12_state_dict.txt"))
    torch.save({"params": params}, path)
    return params


@pytest.mark.parametrize("dim", [300, 312])
def test_release_meta_checkpoint_maps_onto_tasnet(tmp_path, reference_dir, dim):
    params = release_meta_file(tmp_path / "meta.pth", reference_dir, dim)
    ckpt = load_checkpoint(tmp_path / "meta.pth")
    assert (ckpt["kind"], ckpt["semantic_dim"], ckpt["release"]) == ("meta", dim, True)
    model = TasNet(640, dim, HeadConfig())
    load_weights(model, tmp_path / "meta.pth", kind="meta")        # the unused encoder.* is left out
    assert torch.equal(model.word_learner.weight, params["word_learner.fc1_w"])
    assert torch.equal(model.word_learner.bias, params["word_learner.vars.1"])
    assert torch.equal(model.feat_learner.weight, params["feat_learner.weight"])
    with pytest.raises(InputError, match="meta checkpoint is needed|backbone checkpoint is needed"):
        load_weights(build_backbone("res12"), tmp_path / "meta.pth", kind="backbone")


def test_release_meta_checkpoint_with_differing_twins_is_refused(tmp_path, reference_dir):
    params = release_meta_file(tmp_path / "meta.pth", reference_dir)
    params["word_learner.vars.0"] = params["word_learner.vars.0"] + 1
    torch.save({"params": params}, tmp_path / "meta.pth")
    with pytest.raises(InputError, match=r"fc1_w and word_learner\.vars\.0 .*differ"):
        load_checkpoint(tmp_path / "meta.pth")
    params["word_learner.vars.0"] = params["word_learner.fc1_w"]
    del params["word_learner.fc1_b"]
    torch.save({"params": params}, tmp_path / "meta.pth")
    with pytest.raises(InputError, match="fc1_b, which is missing"):
        load_checkpoint(tmp_path / "meta.pth")

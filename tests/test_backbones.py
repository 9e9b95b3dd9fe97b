"""The backbones are the original networks: same state-dict entries, same outputs on seeded weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_backbone

NAMES = ["res12", "wrn28"]


def reference_entries(reference_dir: Path, name: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = reference_dir / f"{name}_state_dict.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (TASNET_REFERENCE holds no listing for {name})")
    entries = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        entries.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return entries


def fill_reference_weights(model: torch.nn.Module) -> None:
    """Fill every entry exactly as the README of the reference folder (``$TASNET_REFERENCE``) prescribes."""
    filled = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        g = torch.Generator().manual_seed(i)
        shape = value.shape
        if key.endswith("num_batches_tracked"):
            filled[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            filled[key] = 0.5 + torch.rand(shape, generator=g)
        elif value.dim() >= 2:
            filled[key] = torch.randn(shape, generator=g) * math.sqrt(2 / (value.numel() // shape[0]))
        elif key.endswith(".weight"):
            filled[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            filled[key] = 0.1 * torch.randn(shape, generator=g)
    model.load_state_dict(filled)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_the_original(reference_dir, name):
    expected = reference_entries(reference_dir, name)
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in build_backbone(name).state_dict().items()]
    assert ours == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_seeded_forward_reproduces_the_original(reference_dir, name):
    reference_entries(reference_dir, name)
    ref = np.load(reference_dir / f"{name}_forward.npz")
    model = build_backbone(name).eval()
    fill_reference_weights(model)
    with torch.no_grad():
        out = model(torch.from_numpy(ref["input"])).numpy()
    assert out.shape == (2, 640)
    rel = np.abs(out - ref["output"]).max() / np.abs(ref["output"]).max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_fixed_pool_refuses_other_sizes_and_adaptive_accepts_them(name):
    torch.manual_seed(0)
    fixed = build_backbone(name).eval()
    adaptive = build_backbone(name, pool="adaptive").eval()
    adaptive.load_state_dict(fixed.state_dict())
    x84 = torch.randn(2, 3, 84, 84)
    x32 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x84), adaptive(x84))
        assert adaptive(x32).shape == (2, 640)
        with pytest.raises(ValueError, match="pool='adaptive'"):
            fixed(x32)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="res12"):
        build_backbone("resnet50")


def test_wrn28_keeps_pytorch_default_initialisation():
    """The release never applies its WRN ``conv_init``: our WRN must start from PyTorch's default init.

    Under one seed, every layer of the WRN must hold the tensors that the same layers, built by hand with
    their default initialisation in the WRN's construction order, would hold: any custom init (the Xavier
    conv weights and zero biases of an earlier version) breaks the equality.
    """
    torch.manual_seed(7)
    model = build_backbone("wrn28")
    torch.manual_seed(7)
    compared = 0
    for name, module in model.named_modules():  # registration order = construction order here
        if isinstance(module, torch.nn.Conv2d):
            reference = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                                        stride=module.stride, padding=module.padding, bias=module.bias is not None)
        elif isinstance(module, torch.nn.BatchNorm2d):
            reference = torch.nn.BatchNorm2d(module.num_features, momentum=module.momentum)
        else:
            continue
        for key, expected in reference.state_dict().items():
            assert torch.equal(module.state_dict()[key], expected), f"{name}.{key} is not PyTorch's default"
        compared += 1
    assert compared == 1 + 12 * 4 + 3 + 1  # stem conv, 12 blocks x (bn1, conv1, bn2, conv2), 3 shortcuts, final bn

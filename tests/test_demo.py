"""The end-to-end demo: ``run_demo.py --quick`` runs every stage and reports sane accuracies; the Conv-4 backbone."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_demo
from models import BACKBONES, build_backbone
from trainer import demo, report
from utils import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHOTS = (1, 5)
CHANCE = 1 / 5


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, Path, str]:
    """Run ``python run_demo.py --quick`` once into temporary folders: (run folder, data root, stdout)."""
    root = tmp_path_factory.mktemp("demo")
    run_dir, data_root = root / "run", root / "data"
    proc = subprocess.run([sys.executable, "run_demo.py", "--quick", "--run_dir", str(run_dir),
                           "--data_root", str(data_root), "--device", "cpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"run_demo.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return run_dir, data_root, proc.stdout


@pytest.mark.slow
def test_quick_demo_leaves_every_stage_file(quick_demo):
    run_dir, data_root, _ = quick_demo
    data = data_root / demo.QUICK_SUBFOLDER / "demo"
    model_type = run_demo.build_parser().get_default("model_type")
    expected = [data / "demo.json", run_dir / "pretrain" / "max_acc.pth", run_dir / "pretrain" / "curves.png",
                run_dir / "protonet" / "result.json", run_dir / "results.json", run_dir / "results.md",
                run_dir / "results.csv", run_dir / "results.png"]
    expected += [data / model_type / f"feat-{split}.npz" for split in ("train", "val", "test")]
    for head in demo.HEADS:
        for shot in SHOTS:
            expected += [run_dir / head / f"shot{shot}" / name for name in ("result.json", "curves.png", "max_acc.pth")]
    missing = [str(path) for path in expected if not path.is_file()]
    assert not missing, f"stages left no {missing}"


@pytest.mark.slow
def test_quick_demo_accuracies_are_finite_and_above_chance(quick_demo):
    run_dir, _, stdout = quick_demo
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["table"]) == {"protonet", *demo.HEADS}
    for method, shots in results["table"].items():
        assert set(shots) == {str(shot) for shot in SHOTS}
        for shot, cell in shots.items():
            assert math.isfinite(cell["acc"]) and math.isfinite(cell["ci95"]), (method, shot, cell)
            assert CHANCE < cell["acc"] <= 1.0, f"{method} {shot}-shot: {cell['acc']} is not above chance"
    # the per-stage result files agree with the table
    for head in demo.HEADS:
        for shot in SHOTS:
            result = json.loads((run_dir / head / f"shot{shot}" / "result.json").read_text())
            assert result["test_acc"] == results["table"][head][str(shot)]["acc"]
            assert result["test_episodes"] == demo.QUICK["test_episodes"]
            assert result["inner_state"] == run_demo.build_parser().get_default("inner_state")
    # the table is printed by trainer.report, one row per method, with the inner-loop mode under it
    for method in ("protonet", "tasnet_fusion", "tasnet_concat"):
        assert f"| {report.METHOD_NAMES[method]} |" in stdout
    assert "inner_state reset" in stdout or "inner_state carry" in stdout


def test_quick_settings_leave_the_arguments_alone():
    args = run_demo.parse_args(["--quick", "--data_root", "somewhere"])
    quick = demo.apply_quick(args)
    assert args.images_per_class == run_demo.build_parser().get_default("images_per_class")
    assert quick.images_per_class == demo.QUICK["images_per_class"]
    assert Path(quick.data_root).name == demo.QUICK_SUBFOLDER
    demo.check_args(quick)  # the quick settings can fill a 5-shot episode with its queries


def test_too_few_images_are_refused_before_any_work():
    args = run_demo.parse_args(["--images_per_class", "10"])
    with pytest.raises(InputError, match="images_per_class"):
        demo.check_args(args)


@pytest.mark.parametrize("name, out_dim", [("conv4", 64), ("conv4_28", 64)])
def test_conv4_backbones_give_finite_features_of_their_out_dim(name, out_dim):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    with torch.no_grad():
        features = model(torch.randn(3, 3, 84, 84))
    assert features.shape == (3, out_dim) == (3, model.out_dim)
    assert torch.isfinite(features).all()


def test_conv4_28_is_conv4_on_pooled_images():
    """conv4_28 equals the same weights applied to the 3x3-average-pooled image, adaptively pooled."""
    torch.manual_seed(0)
    small = build_backbone("conv4_28").eval()
    plain = BACKBONES["conv4"](pool="adaptive").eval()
    plain.load_state_dict(small.state_dict())
    images = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(small(images), plain(torch.nn.functional.avg_pool2d(images, 3)))


def test_conv4_fixed_pool_refuses_other_sizes():
    with pytest.raises(ValueError, match="adaptive"):
        build_backbone("conv4")(torch.randn(1, 3, 64, 64))
    assert build_backbone("conv4", pool="adaptive")(torch.randn(1, 3, 64, 64)).shape == (1, 64)

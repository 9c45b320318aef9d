"""tokenpace eval (table, JSON, sweep plot), tokenpace show (PNGs) and bench --train, on tiny models."""
import json
import os

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tokenpace.cli import main
from tokenpace.evaluate import parse_sweep
from tokenpace.vis import selection_layers, token_overlay

CIFAR = os.environ.get("TOKENPACE_CIFAR",
                       os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_jpeg.npz"))
SAMPLES = os.path.join(os.path.dirname(CIFAR), "sample_images")
TINY_ARGS = "img_size=32,patch_size=4,embed_dim=32,depth=4,num_heads=2,num_classes=10"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                              num_classes=10)
    save_file(model.state_dict(), str(path))
    return str(path)


def test_parse_sweep():
    assert parse_sweep("0.3:1.0:0.1") == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for bad in ("0.3:1.0", "0:1:0.1", "0.5:1.2:0.1", "0.3:1.0:-1", "a:b:c"):
        with pytest.raises(ValueError, match="--keep sweep"):
            parse_sweep(bad)


@pytest.mark.skipif(not os.path.isfile(CIFAR), reason="shared CIFAR-10 not found")
def test_eval_table_json_and_sweep_plot(tiny_checkpoint, tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "sweep.png"
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_checkpoint, "--model-args",
                 TINY_ARGS, "--data", CIFAR, "--limit", "40", "--batch-size", "20", "--workers", "0",
                 "--methods", "evo,idle", "--keep", "0.5:1.0:0.5", "--speed-runs", "1", "--quiet",
                 "--json", str(out), "--plot", str(plot)]) == 0
    assert "agree" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [("dense", None), ("evo", 0.5), ("evo", 1.0), ("idle", 0.5),
                                                        ("idle", 1.0)]
    dense = rows[0]
    assert dense["agreement"] == 100.0 and dense["speedup"] == 1.0
    for r in rows[1:]:
        assert 0 <= r["top1"] <= r["top5"] <= 100
        if r["keep"] == 1.0:  # keep=1 is the dense model: same predictions
            assert r["agreement"] == 100.0 and r["top1"] == dense["top1"]
        else:
            assert r["gmacs"] < dense["gmacs"]
    with Image.open(plot) as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_show_writes_one_png_per_image(tiny_checkpoint, tmp_path):
    images = [os.path.join(SAMPLES, n) for n in ("chelsea.png", "rocket.jpg")]
    if not all(os.path.isfile(p) for p in images):
        pytest.skip("shared sample images not found")
    assert main(["show", *images, "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_checkpoint,
                 "--model-args", TINY_ARGS, "--method", "evo", "--output", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    assert files == ["chelsea_evo.png", "rocket_evo.png"]
    with Image.open(tmp_path / files[0]) as im:
        assert im.size[0] > 3 * 224  # input + the two stage selections of Evo (depth 4: layers 1 and 3)


def test_show_errors(tiny_checkpoint, tmp_path, capsys):
    base = ["show", "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_checkpoint, "--model-args", TINY_ARGS,
            "--output", str(tmp_path)]
    assert main(base[:1] + ["/no/such.png"] + base[1:]) == 2
    assert "cannot read image '/no/such.png'" in capsys.readouterr().err
    assert main(base[:1] + ["/no/such.png"] + base[1:] + ["--method", "idle", "--mode", "layer"]) == 2
    assert "--mode applies to --method evo only" in capsys.readouterr().err


def test_overlay_and_selection_layers():
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    out = token_overlay(img, torch.tensor([0]), (2, 2))
    assert out.getpixel((10, 10)) == (255, 0, 0) and out.getpixel((200, 200)) != (255, 0, 0)
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 2]])
    assert selection_layers([None, a, a, b, b]) == [1, 3]


def test_bench_train_runs_every_objective(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "vit_tiny_patch16_224", "--img-size", "32", "--train", "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["train"] is True and [r["method"] for r in doc["results"]] == ["dense", "evo", "idle", "evit", "topk"]

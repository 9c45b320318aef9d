"""tokenpace eval (table, JSON, sweep plot), tokenpace show (PNGs) and bench --train, on tiny models."""
import json
import os

import numpy as np
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
        with pytest.raises(ValueError, match="--keep-sweep"):
            parse_sweep(bad)


@pytest.mark.skipif(not os.path.isfile(CIFAR), reason="shared CIFAR-10 not found")
def test_eval_table_json_and_sweep_plot(tiny_checkpoint, tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "sweep.png"
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_checkpoint, "--model-args",
                 TINY_ARGS, "--data", CIFAR, "--limit", "40", "--batch-size", "20", "--workers", "0",
                 "--methods", "evo,idle", "--keep-sweep", "0.5:1.0:0.5", "--speed-runs", "1", "--quiet",
                 "--json", str(out), "--plot", str(plot)]) == 0
    assert "agree" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cpu") and doc["amp"] == "none" and doc["images"] == 40
    assert doc["malloc"] == "system"  # a timing condition, as bench records it
    assert doc["checkpoint"] == tiny_checkpoint and doc["input_size"] == [3, 32, 32]  # what was evaluated
    assert doc["model_args"]["embed_dim"] == 32 and doc["config"] is None
    assert set(doc["versions"]) == {"tokenpace", "torch", "timm", "python"}
    rows = doc["rows"]
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


def _show(tiny_checkpoint, out, *images, extra=()):
    return main(["show", *map(str, images), "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_checkpoint,
                 "--model-args", TINY_ARGS, "--output", str(out), *extra])


def test_show_gives_inputs_with_one_stem_distinct_outputs(tiny_checkpoint, tmp_path, capsys):
    from tokenpace.cli.show import output_names

    assert output_names(["a/x.png", "b/x.jpg", "c.png", "d1/y.png", "d2/y.png"]) == [
        "x_png", "x_jpg", "c", "y_png-1", "y_png-2"]
    assert output_names(["x/a.png", "y/a.png", "a_png-1.png"]) == ["a_png-2", "a_png-3", "a_png-1"]
    assert output_names(["A.png", "a.png"]) == ["A_png-1", "a_png-2"]  # one file on case-insensitive systems
    for folder, colour in (("d1", "red"), ("d2", "blue")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 40), colour).save(tmp_path / folder / "y.png")
    assert _show(tiny_checkpoint, tmp_path / "out", tmp_path / "d1" / "y.png", tmp_path / "d2" / "y.png",
                 extra=("--method", "topk")) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["y_png-1_topk.png", "y_png-2_topk.png"]
    assert f"y_png-2_topk.png ({tmp_path / 'd2' / 'y.png'})" in capsys.readouterr().out  # which input is which


def test_show_checks_every_input_before_drawing(tiny_checkpoint, tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    out = tmp_path / "out"
    for bad, message in ((readme, "cannot read image"), (truncated, "cannot read image"),
                         ("/no/such.png", "cannot read image '/no/such.png'")):
        assert _show(tiny_checkpoint, out, good, bad, good) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and str(bad) in err
        assert not out.exists()  # nothing drawn, no folder made
    assert _show(tiny_checkpoint, out, good, extra=("--method", "idle", "--mode", "layer")) == 2
    assert "--mode applies to --method evo only" in capsys.readouterr().err
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert _show(tiny_checkpoint, a_file, good) == 2
    assert f"--output '{a_file}' is a file" in capsys.readouterr().err and a_file.read_text() == "x"


def test_show_draws_on_what_the_model_saw(tiny_checkpoint, tmp_path):
    """A wide image, red | green | blue thirds: the model sees the centre crop, mostly green with red and blue
    edges; the old drawing squashed the whole image, putting red at 30% of the panel's width."""
    from tokenpace.vis import PANEL

    wide = np.zeros((48, 96, 3), dtype=np.uint8)
    wide[:, :32, 0] = wide[:, 32:64, 1] = wide[:, 64:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert _show(tiny_checkpoint, tmp_path / "out", tmp_path / "wide.png") == 0
    with Image.open(tmp_path / "out" / "wide_evo.png") as figure:
        pad, head = 6, 34
        px = lambda fx: figure.convert("RGB").getpixel((pad + int(fx * PANEL), head + PANEL // 2))
        assert px(0.3)[1] > 200 and px(0.3)[0] < 60  # green (the crop), not red
        assert px(0.02)[0] > 200 and px(0.98)[2] > 200  # the red and blue edges of the crop


def test_sixteen_bit_grayscale_is_not_blank(tmp_path):
    from tokenpace.vis import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert image.shape == (64, 64, 3) and image.min() == 0 and image.max() == 255
    assert 100 < image.mean() < 155  # a ramp, not clipped to white


def test_show_defaults_to_the_family_method(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    swin = ("img_size=32,patch_size=2,depths=2/2/2/2,num_heads=2/2/4/4,embed_dim=32,window_size=4,num_classes=10")
    assert main(["show", str(image), "--model", "swin_tiny_patch4_window7_224", "--model-args", swin,
                 "--output", str(tmp_path / "out")]) == 0
    assert os.listdir(tmp_path / "out") == ["a_idle.png"]


def test_overlay_and_selection_layers():
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    out = token_overlay(img, torch.tensor([0]), (2, 2))
    assert out.getpixel((10, 10)) == (255, 0, 0) and out.getpixel((200, 200)) != (255, 0, 0)
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 2]])
    assert selection_layers([None, a, a, b, b]) == [1, 3]


def test_bench_train_runs_every_objective(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--train", "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["train"] is True and [r["method"] for r in doc["results"]] == ["dense", "evo", "idle", "evit", "topk"]


@pytest.fixture
def evo_run(tmp_path, tiny_checkpoint):
    """A run folder as `tokenpace train` writes it, trained for Evo(keep=0.25, stage_starts=(1,))."""
    import shutil

    run = tmp_path / "evo_run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "model.safetensors")
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    method = {"name": "evo", "keep": 0.25, "stage_starts": [1], "mode": "stage", "representative": None,
              "alpha": 0.5, "score": None}
    (run / "run.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_args": args, "method": method}))
    return str(run)


@pytest.mark.skipif(not os.path.isfile(CIFAR), reason="shared CIFAR-10 not found")
def test_eval_of_a_run_reapplies_its_recorded_method(evo_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    common = ["eval", "--run", evo_run, "--data", CIFAR, "--limit", "8", "--batch-size", "8", "--workers", "0",
              "--speed-runs", "1", "--quiet", "--json", str(out)]
    assert main(common) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["config"]) for r in rows] == [("dense", "-"), ("evo", "keep=0.25 stage_starts=(1,)")]
    assert "note" not in capsys.readouterr().err
    assert main(common + ["--keep", "0.5"]) == 0
    assert "was trained with evo keep=0.25; the command line gives keep=0.5" in capsys.readouterr().err
    assert [r["config"] for r in json.loads(out.read_text())["rows"]] == ["-", "keep=0.5 stage_starts=(1,)"]
    assert main(common + ["--methods", "evo,evo:score=random,idle"]) == 0
    configs = [r["config"] for r in json.loads(out.read_text())["rows"]]
    assert configs == ["-", "keep=0.25 stage_starts=(1,)", "keep=0.25 stage_starts=(1,) score=random", "keep=0.7"]


def test_show_of_a_run_reapplies_its_recorded_method(evo_run, tmp_path, monkeypatch, capsys):
    import tokenpace
    import tokenpace.vis

    seen = []
    real = tokenpace.vis.selection_figure

    def spy(model, *args, **kwargs):
        seen.append(tokenpace.get_patch(model).config)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tokenpace.vis, "selection_figure", spy)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    assert main(["show", str(image), "--run", evo_run, "--output", str(tmp_path / "o")]) == 0
    assert main(["show", str(image), "--run", evo_run, "--keep", "0.5", "--output", str(tmp_path / "o")]) == 0
    assert seen == [tokenpace.Evo(keep=0.25, stage_starts=(1,)), tokenpace.Evo(keep=0.5, stage_starts=(1,))]
    assert "was trained with keep=0.25; --keep gives 0.5" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(CIFAR), reason="shared CIFAR-10 not found")
def test_eval_of_a_run_with_a_config_runs_the_file_and_says_it_replaces_the_run(evo_run, tmp_path, capsys):
    import tokenpace

    config = str(tmp_path / "idle.json")
    tokenpace.save_config(tokenpace.Idle(keep=0.5), config)
    out = tmp_path / "eval.json"
    common = ["eval", "--run", evo_run, "--data", CIFAR, "--limit", "8", "--batch-size", "8", "--workers", "0",
              "--speed-runs", "1", "--quiet", "--json", str(out), "--config", config]
    assert main(common) == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["dense", "idle"]
    assert f"--config {config} replaces the method run {evo_run!r} was trained for (evo)" in capsys.readouterr().err
    assert main(common + ["--keep", "0.3"]) == 2
    assert capsys.readouterr().err.strip().endswith("--config and --keep both choose the configuration; give one")


@pytest.mark.skipif(not os.path.isfile(CIFAR), reason="shared CIFAR-10 not found")
def test_eval_without_weights_says_they_are_random_and_names_the_tuned_run(tmp_path, capsys):
    config = tmp_path / "tokenpace.json"
    config.write_text(json.dumps({"method": "topk", "options": {"keep": 0.5}, "run": "runs/dense"}))
    common = ["eval", "--model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS, "--data", CIFAR, "--limit", "8",
              "--batch-size", "8", "--workers", "0", "--speed-runs", "1", "--quiet"]
    assert main(common + ["--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert ("no --run, --checkpoint or --pretrained: the model has random weights (timm's initialisation); "
            f"{config} was tuned on the run 'runs/dense': add --run runs/dense") in err
    assert main([*common[:4], TINY_ARGS.replace(",num_classes=10", ""), *common[5:], "--methods", "dense"]) == 0
    assert "the model predicts 1000 classes and" in capsys.readouterr().err  # a head not made for these labels


def test_selection_figures_show_the_eval_selection_and_restore_the_mode():
    import numpy as np
    import timm
    import torch

    import tokenpace
    from tokenpace.vis import selection_figure

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2,
                              drop_path_rate=0.5, drop_rate=0.5)  # created in train mode, as timm does
    tokenpace.apply(model, "evo", keep=0.5)
    pixels = torch.randn(3, 32, 32)
    first, second = (np.asarray(selection_figure(model, pixels)) for _ in range(2))
    assert model.training and (first == second).all()  # no dropout in the figure, the caller's mode kept

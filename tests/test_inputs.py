"""Bad files, folders and downloads: one line naming the file or value and what is accepted, exit code 2, nothing
written. timm-format checkpoints load; offline machines fail in seconds."""
import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import CIFAR, TINY, TINY_ARGS, needs_cifar, train_argv
from tokenpace.cli import main
from tokenpace.data import DataSpec, PackedJpegDataset, build_dataset
from tokenpace.errors import TokenpaceError
from tokenpace.weights import load_weights

TINY10 = dict(TINY, num_classes=10)


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    lines = [l for l in lines if "warning: " not in l]
    assert len(lines) == 1 and lines[0].startswith("tokenpace: error:"), lines
    return lines[0]


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _packed(path, images: list[bytes], labels, classes=("a", "b")):
    blob = np.frombuffer(b"".join(images), dtype=np.uint8)
    offsets = np.cumsum([0] + [len(i) for i in images])
    arrays = {}
    for split in ("train", "test"):
        arrays.update({f"{split}_jpeg": blob, f"{split}_offsets": offsets, f"{split}_labels": np.asarray(labels)})
    np.savez(path, classes=np.asarray(classes), **arrays)
    return str(path)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY10).state_dict()


def test_packed_jpeg_files_are_checked_when_opened(tmp_path):
    good = [_jpeg((255, 0, 0)), _jpeg((0, 255, 0)), _jpeg((0, 0, 255))]
    ok = _packed(tmp_path / "ok.npz", good, [0, 1, 0])
    assert len(PackedJpegDataset(ok)) == 3
    cases = {
        "truncated.npz": (lambda p: p.write_bytes(open(ok, "rb").read()[:500]), "is not a readable .npz file"),
        "text.npz": (lambda p: p.write_text("hello"), "is not a readable .npz file"),
        "empty.npz": (lambda p: p.write_bytes(b""), "is not a readable .npz file"),
        "garbage.npz": (lambda p: _packed(p, [good[0], b"\x00" * 40, good[2]], [0, 1, 0]),
                        "image 1 is not a whole JPEG"),
        "cut.npz": (lambda p: _packed(p, [good[0], good[1][:-30], good[2]], [0, 1, 0]), "image 1 is not a whole JPEG"),
        "labels.npz": (lambda p: _packed(p, good, [0, 50, 1]), "labels must lie in 0..1 (its 2 classes); found 0..50"),
        "negative.npz": (lambda p: _packed(p, good, [0, -1, 1]), "labels must lie in 0..1"),
    }
    for name, (make, message) in cases.items():
        make(tmp_path / name)
        with pytest.raises(TokenpaceError, match=message.replace("(", r"\(").replace(")", r"\)")):
            PackedJpegDataset(str(tmp_path / name))
    z = dict(np.load(ok))
    z["train_offsets"] = z["train_offsets"][::-1].copy()
    np.savez(tmp_path / "offsets.npz", **z)
    with pytest.raises(TokenpaceError, match=r"bad offsets from image 0"):
        PackedJpegDataset(str(tmp_path / "offsets.npz"))


def test_a_corrupt_image_inside_is_one_line_even_from_a_worker(tmp_path):
    good = _jpeg((255, 0, 0))
    broken = good[:2] + bytes(len(good) - 4) + good[-2:]  # start and end markers, nothing decodable between
    path = _packed(tmp_path / "bad.npz", [good, broken], [0, 1])
    loader = torch.utils.data.DataLoader(build_dataset(DataSpec(path), "train", lambda im: torch.zeros(1)),
                                         batch_size=2, num_workers=1)
    with pytest.raises(TokenpaceError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"{path} (train): image 1 cannot be decoded") and "\n" not in str(info.value)


def test_an_image_folder_whose_split_has_no_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(TokenpaceError, match="data folder '.*val' holds no images; expected"):
        build_dataset(DataSpec(str(tmp_path)), "val")


def test_cifar10_download_fails_fast_offline(tmp_path, monkeypatch):
    import tokenpace.net

    monkeypatch.setattr(tokenpace.net, "reachable", lambda *a, **k: False)
    with pytest.raises(TokenpaceError, match="CIFAR-10 is not in .* and www.cs.toronto.edu cannot be reached"):
        build_dataset(DataSpec("cifar10", download_root=str(tmp_path)), "train")


def test_reachable_is_bounded():
    from tokenpace.net import reachable

    start = time.time()
    assert reachable("host.invalid", timeout=1.0) is False
    # bounded by the timeout, not by a resolver's retries (a minute); the margin covers a loaded 2-core machine
    # (seen: 5 s once in a full suite run)
    assert time.time() - start < 10


def _broken_checkpoints(tmp_path, weights):
    save_file(weights, str(tmp_path / "ok.safetensors"))
    torch.save({"model": weights}, tmp_path / "ok.pth")
    files = {"empty.pth": b"", "cut.pth": (tmp_path / "ok.pth").read_bytes()[:2000],
             "cut.safetensors": (tmp_path / "ok.safetensors").read_bytes()[:2000]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [str(tmp_path / name) for name in files]


@needs_cifar
def test_broken_checkpoints_are_one_line_in_every_command(tmp_path, tiny_weights, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    for path in _broken_checkpoints(tmp_path, tiny_weights):
        source = ["--model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS + ",num_classes=10"]
        run = tmp_path / f"run_{os.path.basename(path)}"
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_args": TINY10}))
        (run / "model.safetensors").write_bytes(open(path, "rb").read())
        commands = [
            (train_argv(tmp_path / "t", "--recipe", "finetune", "--checkpoint", path), path),
            (["eval", *source, "--checkpoint", path, "--data", CIFAR, "--limit", "4"], path),
            (["show", str(image), *source, "--checkpoint", path, "--output", str(tmp_path / "s")], path),
            (["eval", "--run", str(run), "--data", CIFAR, "--limit", "4"], str(run / "model.safetensors")),
            (["show", str(image), "--run", str(run), "--output", str(tmp_path / "s")], str(run / "model.safetensors")),
        ]
        for argv, named in commands:
            assert main(argv) == 2, argv
            err = _err(capsys)
            assert f"checkpoint {named!r}" in err and ("empty file" in err or "cannot be read" in err), err
        assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_timm_format_checkpoints_load(tmp_path, tiny_weights):
    """timm's train.py checkpoints: state_dict (and EMA) entries, its args, DDP's module. prefix."""
    model = timm.create_model("vit_tiny_patch16_224", **TINY10)
    prefixed = {f"module.{k}": v for k, v in tiny_weights.items()}
    torch.save({"epoch": 3, "arch": "vit", "args": argparse.Namespace(model="vit", lr=0.1), "state_dict": prefixed,
                "state_dict_ema": prefixed, "version": 2}, tmp_path / "timm.pth.tar")
    load_weights(model, str(tmp_path / "timm.pth.tar"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_weights.items())


def test_foreign_weights_name_the_keys_that_do_not_fit(tmp_path, tiny_weights):
    other = {k: v for k, v in tiny_weights.items() if not k.startswith("blocks.3.")}
    other["extra.weight"] = torch.zeros(2)
    other["head.weight"] = torch.zeros(5, 32)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(TokenpaceError) as info:
        load_weights(timm.create_model("vit_tiny_patch16_224", **TINY10), str(tmp_path / "other.safetensors"))
    message = str(info.value)
    assert "does not fit model VisionTransformer" in message and "missing keys (blocks.3." in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "1 keys of another shape (head.weight (5, 32) vs model (10, 32))" in message


def _hub_env(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_pretrained_offline_fails_fast_with_one_line(tmp_path):
    # the hub is made unreachable in the child (an empty cache, and no network wait even where there is network)
    code = ("import sys, tokenpace.net as n\nn.reachable = lambda *a, **k: False\nfrom tokenpace.cli import main\n"
            "sys.exit(main(['bench', '--model', 'vit_tiny_patch16_224', '--pretrained', '--methods', 'dense']))")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_hub_env(tmp_path))
    assert proc.returncode == 2 and time.time() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the pretrained weights of 'vit_tiny_patch16_224' are not in the local cache" in lines[0]


@needs_cifar
def test_train_pretrained_from_the_local_cache(tmp_path):
    """`train --pretrained` fine-tunes timm's pretrained weights; offline they come from the hub's local cache."""
    torch.manual_seed(1)
    weights = timm.create_model("vit_tiny_patch16_224").state_dict()
    repo = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg["hf_hub_id"]
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = dict(_hub_env(tmp_path), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "tokenpace.cli", "train", "--model", "vit_tiny_patch16_224", "--img-size", "32",
            "--pretrained", "--data", CIFAR, "--limit", "16", "--batch-size", "8", "--workers", "0", "--quiet",
            "--epochs", "1"]
    proc = subprocess.run(base + ["--recipe", "finetune", "--method", "dense", "--output", str(tmp_path / "ft")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["pretrained"] is True
    from safetensors.torch import load_file

    tuned = load_file(str(tmp_path / "ft" / "model.safetensors"))
    qkv = "blocks.5.attn.qkv.weight"
    assert (tuned[qkv] - weights[qkv]).abs().max() < 1e-3  # started from the cached weights (lr 2e-5 x 8/512)
    # distilling from pretrained weights whose head timm replaced (1000 -> 10 classes) is refused
    proc = subprocess.run(base + ["--recipe", "idle-finetune", "--output", str(tmp_path / "idle")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "the teacher's head would be random" in proc.stderr
    assert not (tmp_path / "idle").exists()


def test_load_weights_leaves_a_classifier_of_another_class_count_at_its_initialisation(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", **TINY)  # 1000 classes
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = timm.create_model("vit_tiny_patch16_224", **TINY10)
    head = model.head.weight.detach().clone()
    with pytest.raises(TokenpaceError, match=r"2 keys of another shape \(head.weight \(1000, 32\) vs model \(10"):
        load_weights(model, str(tmp_path / "w.safetensors"))  # strict by default: eval and bench need the head
    assert load_weights(model, str(tmp_path / "w.safetensors"), new_head=("head",)) == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@needs_cifar
def test_fine_tuning_a_checkpoint_made_for_other_classes_starts_a_new_head(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", **TINY).state_dict(), str(tmp_path / "in1k.safetensors"))
    common = ["--checkpoint", str(tmp_path / "in1k.safetensors"), "--epochs", "1", "--limit", "16"]
    assert main(train_argv(tmp_path / "ft", "--recipe", "finetune", "--method", "dense", *common)) == 0
    assert ("in1k.safetensors: its classifier (head.weight, head.bias) was made for another class count than this "
            "model's 10; it starts from timm's initialisation") in capsys.readouterr().err
    assert main(train_argv(tmp_path / "idle", "--recipe", "idle-finetune", *common)) == 2
    assert "the classifier of" in capsys.readouterr().err and not (tmp_path / "idle").exists()

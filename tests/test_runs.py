"""Run folders and the training loop: nothing overwritten unasked, --resume with the recorded settings (teacher
included), one-line errors for a diverging loss or too large a batch, no host sync per step, epoch-seeded data."""
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import CIFAR, needs_cifar, train_argv, train_config
from tokenpace.cli import main
from tokenpace.train import TrainError, train

pytestmark = needs_cifar


def _state(folder):
    return torch.load(os.path.join(folder, "last.pth"), map_location="cpu", weights_only=True)


def _err(capsys) -> str:
    """The one error line (notes, such as the short test runs' warm-up note, may come before it)."""
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("tokenpace: note:")]
    assert len(lines) == 1 and lines[0].startswith("tokenpace: error:"), lines
    return lines[0]


def test_idle_finetune_resumes_with_its_teacher(tmp_path, capsys, monkeypatch):
    """--resume alone continues with the recorded settings, and the teacher is rebuilt from the recorded starting
    weights (it was a copy of a random student before): split == straight, bit for bit. Paths given relative to
    the working folder are recorded absolute: the run resumes from any other folder."""
    dense = tmp_path / "dense"
    assert main(train_argv(dense, "--recipe", "dense", "--epochs", "1")) == 0
    monkeypatch.chdir(tmp_path)
    # fine-tune from the dense run folder: its model and model arguments come with it
    common = ["train", "--recipe", "idle-finetune", "--run", "dense", "--data", os.path.relpath(CIFAR, tmp_path),
              "--limit", "64", "--batch-size", "16", "--workers", "0", "--quiet", "--epochs", "2"]
    assert main(common + ["--output", "straight"]) == 0
    assert main(common + ["--output", "split", "--stop-after", "1"]) == 0
    monkeypatch.chdir(tmp_path / "dense")
    assert main(["train", "--output", str(tmp_path / "split"), "--resume", "--workers", "0", "--quiet"]) == 0
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    recorded = json.loads((tmp_path / "split" / "run.json").read_text())
    assert recorded["init"] == str(dense / "model.safetensors") and len(recorded["init_sha256"]) == 64
    assert recorded["data"]["path"] == os.path.abspath(CIFAR)
    assert recorded["model_args"]["depth"] == 4 and recorded["recipe"]["name"] == "idle-finetune"

    # the API refuses a fine-tune resume without its starting weights, and a changed weights file
    cfg = train_config(tmp_path, "idle-finetune", "split", resume=True)
    with pytest.raises(TrainError, match="fine-tunes dense weights"):
        train(cfg)
    weights = dense / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    assert main(["train", "--output", str(tmp_path / "split"), "--resume", "--workers", "0", "--quiet"]) == 2
    assert "changed since the run started (its sha256 differs)" in _err(capsys)


def test_an_existing_run_is_neither_overwritten_nor_changed_unasked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(out, "--recipe", "dense", "--epochs", "1")) == 0
    capsys.readouterr()
    names = ("run.json", "metrics.jsonl", "last.pth", "model.safetensors")
    before = {name: (out / name).read_bytes() for name in names}
    assert main(train_argv(out, "--recipe", "dense", "--epochs", "1")) == 2
    assert (f"--output '{out}' already holds a run (last.pth, model.safetensors); continue it with --resume, "
            "replace it with --overwrite") in _err(capsys)
    resume = ["train", "--output", str(out), "--resume", "--workers", "0", "--quiet"]
    for change, named in ((["--limit", "32"], "data.limit 32 (recorded 64)"),
                          (["--batch-size", "8"], "batch_size 8 (recorded 16)"),
                          (["--epochs", "3"], "epochs 3 (recorded 1)"),
                          (["--lr", "0.1"], "lr 0.1 (recorded None)"),
                          (["--recipe", "evo-scratch"], "recipe.name 'evo-scratch' (recorded 'dense')"),
                          (["--model-args", "depth=2"], "model_args.depth 2 (recorded 4)")):
        assert main(resume + change) == 2
        err = _err(capsys)
        assert named in err and "Drop them to continue as recorded, or start afresh with --overwrite" in err
    assert {name: (out / name).read_bytes() for name in names} == before
    # a checkpoint of another architecture (no run.json to compare with): the keys are named
    (out / "run.json").unlink()
    argv = train_argv(out, "--recipe", "dense", "--epochs", "1", "--resume")
    argv[argv.index("--model-args") + 1] = "img_size=32,patch_size=8,embed_dim=32,depth=2,num_heads=2"
    assert main(argv) == 2
    assert "unexpected keys (blocks.2.norm1.weight" in _err(capsys)
    # --overwrite starts afresh
    assert main(train_argv(out, "--recipe", "dense", "--epochs", "1", "--limit", "32", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["data"]["limit"] == 32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_diverging_loss_stops_with_one_line_naming_epoch_and_step(tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(train_argv(out, "--recipe", "dense", "--epochs", "2", "--lr", "1e30")) == 2
    err = _err(capsys)
    assert "the loss became NaN or infinite at epoch 1, step" in err and "no checkpoint was written yet" in err
    assert not (out / "last.pth").exists()


def test_a_batch_the_machine_cannot_hold_is_one_line(tmp_path, monkeypatch, capsys):
    from tokenpace.train import objectives

    def exhausted(self, images, targets):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 100000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(objectives.Objective, "forward", exhausted)
    assert main(train_argv(tmp_path / "oom", "--recipe", "dense", "--epochs", "1")) == 2
    assert ("a training step at --batch-size 16 does not fit in memory: one allocation asked for 93.1 GiB; use a "
            "smaller --batch-size") in _err(capsys)


def test_interrupted_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    from tokenpace.train.checkpoint import atomic_save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"a": 1}, str(tmp_path / "last.pth"))
    assert os.listdir(tmp_path) == []
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth.tmp-12345").write_bytes(b"what a killed writer left")
    train(train_config(tmp_path, epochs=1))
    assert sorted(os.listdir(out)) == ["last.pth", "metrics.jsonl", "model.safetensors", "run.json"] + (
        ["tb"] if os.path.isdir(out / "tb") else [])


def test_validation_runs_under_the_training_autocast(tmp_path):
    # a process of its own: Accelerate's state keeps the first mixed precision a process asked for
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import train_config
from tokenpace.train import loop, train
from pathlib import Path
dtypes, create = set(), loop.create_student
def spied(cfg, num_classes, notes=None):
    model = create(cfg, num_classes, notes)
    model.head.register_forward_hook(lambda m, i, out: None if m.training else dtypes.add(out.dtype))
    return model
loop.create_student = spied
train(train_config(Path({str(tmp_path)!r}), epochs=1, amp="bf16", cpu=True, limit=32))
print(sorted(map(str, dtypes)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['torch.bfloat16']"


def test_training_steps_do_not_sync_with_the_host(tmp_path, monkeypatch):
    """Loss terms, accuracy and the finite-loss check stay on the device: host reads do not grow with the steps."""
    from accelerate import Accelerator

    from tokenpace.train import loop

    class Objective(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(4, 3)

        def forward(self, x, y):
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y)
            return loss, {"ce": loss.detach()}, logits

    accelerator = Accelerator(cpu=True)
    objective = Objective()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    scheduler = SimpleNamespace(step_update=lambda n: None)
    cfg = SimpleNamespace(output=str(tmp_path), amp="none")
    reads = Counter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (
            reads.update([_name]), _real(self, *a, **k))[1])

    def host_reads(steps):
        reads.clear()
        batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * steps
        sums, correct, seen, _ = loop._run_epoch(0, objective, objective.model, batches, optimizer, scheduler,
                                                 None, None, accelerator, None, cfg)
        assert seen == 2 * steps and set(sums) == {"loss", "ce"}
        return sum(reads.values())

    assert host_reads(3) == host_reads(9) <= 4


def test_epoch_batches_do_not_depend_on_workers_or_where_a_run_resumed(tmp_path):
    from tokenpace.data import build_dataset
    from tokenpace.train import loop

    cfg = train_config(tmp_path, workers=2, batch_size=8, limit=16)
    model = loop.create_student(cfg, 10)
    train_tf, _ = loop.build_transforms(cfg, model)  # RandAugment, random erasing: random per sample
    ds = build_dataset(cfg.data, "train", train_tf)
    sampler, loader, val_loader = loop._loaders(cfg, ds, ds, torch.device("cpu"))
    assert loader.persistent_workers and val_loader.persistent_workers and not loader.pin_memory

    def epoch(sampler, loader, e):
        sampler.start_epoch(e)
        return [images for images, _ in loader]

    straight = [epoch(sampler, loader, e) for e in (0, 1)]
    fresh_sampler, fresh_loader, _ = loop._loaders(dataclasses.replace(cfg, workers=0), ds, ds, torch.device("cpu"))
    resumed = epoch(fresh_sampler, fresh_loader, 1)
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed))
    assert not torch.equal(straight[0][0], straight[1][0])


def test_resume_ignores_the_derived_method_record_but_not_the_recipe(tmp_path):
    """run.json's top-level method is derived from the recipe (how may change between versions: a layer-mode Evo
    fine-tune was recorded as evaluated in stage mode); the recipe's own method is what a resume must match."""
    from tokenpace.train.runfolder import RunFolderError, check_resume

    evo = {"name": "evo", "keep": 0.5, "mode": "layer"}
    recorded = {"recipe": {"name": "finetune", "method": evo}, "method": {**evo, "mode": "stage"}, "epochs": 3}
    (tmp_path / "run.json").write_text(json.dumps(recorded))
    check_resume(str(tmp_path), {**recorded, "method": evo})  # no error: only the derived record differs
    with pytest.raises(RunFolderError, match="recipe.method"):
        check_resume(str(tmp_path), {**recorded, "recipe": {"name": "finetune", "method": {**evo, "keep": 0.7}}})


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "15"], "recipe 'dense' mixes images in pairs (mixup/cutmix), which needs an even batch size; "
                             "got 15"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a GPU: on the CPU Accelerate runs fp16 in float32"),
])
def test_settings_a_run_cannot_honour_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = train_argv(out, "--recipe", "dense", "--epochs", "1")
    argv[argv.index("--batch-size"):argv.index("--batch-size") + 2] = []
    assert main(argv + (extra if "--batch-size" in extra else extra + ["--batch-size", "16"])) == 2
    assert message in _err(capsys) and not out.exists()


def test_the_largest_seed_trains_past_its_first_epoch_and_a_low_peak_is_the_floor(tmp_path, capsys):
    out = tmp_path / "seed"
    assert main(train_argv(out, "--recipe", "dense", "--epochs", "2", "--seed", str(2**32 - 1), "--lr", "1e-7",
                           "--warmup-epochs", "0")) == 0
    assert "the peak learning rate 1e-07 is below the recipe's min_lr" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-7, 1e-7]  # flat at the peak: not rising towards the recipe's floor

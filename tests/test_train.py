"""Training pipeline on a few dozen real CIFAR-10 images and a tiny ViT: recipes, resume, faults, export."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import tokenpace
from tokenpace.cli import main, make_parser
from tokenpace.data import DataSpec, PackedJpegDataset, build_dataset
from tokenpace.train import get_recipe, train

from conftest import CIFAR, TINY, TINY_ARGS, needs_cifar, train_config as _config

pytestmark = needs_cifar


def _final_state(path):
    return torch.load(os.path.join(path, "last.pth"), map_location="cpu", weights_only=False)


def test_packed_jpeg_reader_and_limits(capsys):
    assert len(PackedJpegDataset(CIFAR, "val", limit=10001)) == 10000  # all of them, and said
    assert "limit 10001 (--limit) is more than the 10000 images of" in capsys.readouterr().err
    ds = PackedJpegDataset(CIFAR, "val", limit=20)
    labels = [ds[i][1] for i in range(20)]
    assert len(ds) == 20 and ds[0][0].size == (32, 32) and len(set(labels)) == 10  # spread over the classes
    assert len(build_dataset(DataSpec(CIFAR, canvas=64, limit=3), "train")) == 3
    assert build_dataset(DataSpec(CIFAR, canvas=64, limit=3), "train")[0][0].size == (64, 64)


def test_resume_is_bit_exact(tmp_path, capsys):
    straight = _config(tmp_path, "evo-scratch", "straight")
    used = []  # the lr of every optimizer step, as the optimizer saw it
    hook = register_optimizer_step_pre_hook(  # every torch optimizer: Accelerate's wrapper is not one
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        history = train(straight)
    finally:
        hook.remove()
    per_epoch = len(used) // 2
    assert len(used) == 2 * per_epoch > 2 and used[0] < used[-1]  # warming up: every step's lr differs
    for epoch, record in enumerate(history):  # metrics.jsonl: the last and the highest lr of the epoch's steps
        steps = used[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert (record["lr"], record["lr_peak"]) == (steps[-1], max(steps))
    assert "the learning rate warms up over 5 epochs and the run has 2: it never reaches its peak" in \
        capsys.readouterr().err  # said; the tests' short runs are meant so
    first = _config(tmp_path, "evo-scratch", "split", stop_after=1)
    train(first)
    assert _final_state(first.output)["epoch"] == 1 and not os.path.exists(os.path.join(first.output,
                                                                                          "model.safetensors"))
    train(_config(tmp_path, "evo-scratch", "split", resume=True))
    a, b = _final_state(straight.output), _final_state(first.output)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["extra"]["aux_head"]:
        assert torch.equal(a["extra"]["aux_head"][key], b["extra"]["aux_head"][key])
    capsys.readouterr()
    train(_config(tmp_path, "evo-scratch", "split", resume=True))  # a finished run: said, not silent
    assert "already holds all 2 epochs; nothing to resume" in capsys.readouterr().err
    lines = [json.loads(l) for l in open(os.path.join(first.output, "metrics.jsonl"))]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[0]["method_mode"] == "layer"
    assert lines[1]["method_mode"] == "stage"  # layer-to-stage: 2/3 of 2 epochs -> epoch 1 layer, epoch 2 stage


def test_export_loads_into_plain_timm_and_runs_patched(tmp_path):
    cfg = _config(tmp_path, epochs=1)
    train(cfg)
    state = load_file(os.path.join(cfg.output, "model.safetensors"))
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY)
    plain.load_state_dict(state, strict=True)
    run = json.load(open(os.path.join(cfg.output, "run.json")))
    assert run["model_args"]["num_classes"] == 10 and run["recipe"]["name"] == "dense"
    assert run["processes"] == 1 and run["data"]["limit"] == 64 and run["method"] is None
    assert tokenpace.apply(plain, "idle")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("cut_mode", ["both", "none"])
def test_idle_finetune_logs_every_loss_term(tmp_path, cut_mode):
    dense = _config(tmp_path, epochs=1, name="dense")
    train(dense)
    cfg = _config(tmp_path, "idle-finetune", init=os.path.join(dense.output, "model.safetensors"), epochs=1)
    cfg.recipe = cfg.recipe.__class__(**{**cfg.recipe.__dict__, "cut_mode": cut_mode})
    history = train(cfg)
    terms = set(history[0])
    assert {"loss", "ce", "kl", "feature", "lr", "train_top1", "val_top1", "val_top5", "img_per_s"} <= terms
    assert ("cut" in terms) == (cut_mode != "none")
    assert 0 < history[0]["lr"] <= history[0]["lr_peak"]  # the rates the epoch's steps used, not the next one's
    state = _final_state(cfg.output)
    init = load_file(os.path.join(dense.output, "model.safetensors"))
    assert torch.equal(state["model"]["pos_embed"], init["pos_embed"])  # frozen, as in the official recipe
    assert not torch.equal(state["model"]["blocks.3.attn.qkv.weight"], init["blocks.3.attn.qkv.weight"])


def test_a_killed_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    def command(out):
        return [sys.executable, "-m", "tokenpace.cli", "train", "--recipe", "dense", "--data", CIFAR, "--output",
                str(out), "--model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS, "--epochs", "3",
                "--batch-size", "16", "--limit", "160", "--workers", "0", "--quiet"]

    out = tmp_path / "killed"
    cmd = command(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "last.pth"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in epoch 2, or while epoch 2's checkpoint is being written
    proc.wait()
    assert _final_state(str(out))["epoch"] in (1, 2)  # it loads: never a truncated file
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, capture_output=True)
    a, b = _final_state(str(out)), _final_state(str(straight))
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lines = [json.loads(l)["epoch"] for l in open(out / "metrics.jsonl")]
    assert lines == [1, 2, 3]


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "fast"], "argument --recipe: invalid choice: 'fast' (choose from 'dense', 'evo-scratch', 'idle-finetune'"),
    (["--recipe", "dense", "--data", "/no/such.npz"], "data path '/no/such.npz' does not exist"),
    (["--recipe", "dense", "--data", "/no/such/folder"], "does not exist; accepted: a packed-JPEG .npz file"),
    (["--recipe", "dense", "--data", __file__], "is not a data set; accepted: a packed-JPEG .npz file"),
    (["--recipe", "idle-finetune"], "fine-tunes dense weights (and builds any teacher from them): pass --checkpoint"),
    (["--recipe", "dense", "--cut-mode", "all"], "argument --cut-mode: invalid choice: 'all'"),
    (["--recipe", "dense", "--keep", "0.5"], "--keep/--score need a method"),
    (["--recipe", "dense", "--method", "evo", "--keep", "3"], "argument --keep: expected a keep ratio in (0, 1]"),
    (["--recipe", "dense", "--method", "evo", "--score", "best"], "Evo score='best' is not accepted"),
    (["--recipe", "dense", "--model", "nope"], "unknown timm model 'nope'"),
    (["--recipe", "dense", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--recipe", "dense", "--epochs", "-2"], "argument --epochs: expected an integer >= 1, got '-2'"),
    (["--recipe", "dense", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["--recipe", "dense", "--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["--recipe", "idle-finetune", "--cut-weight", "-1"], "argument --cut-weight: expected a finite number >= 0"),
    (["--recipe", "idle-finetune", "--distill-weight", "inf"], "argument --distill-weight: expected a finite number"),
    (["--recipe", "dense", "--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    (["--recipe", "dense", "--seed", "-5"], "argument --seed: expected an integer from 0 to 4294967295, got '-5'"),
    (["--recipe", "dense", "--resume", "--overwrite"], "--resume continues a run and --overwrite replaces it"),
    (["--data", "x.npz"], "--recipe is required (unless --resume continues a run with a run.json)"),
    (["--resume"], "holds no run to continue (no run.json); start it with --recipe"),
    (["--recipe", "dense", "--model-args", "num_classes=5"], "has labels 0..9, outside the model's 5 classes"),
    (["--recipe", "dense", "--device", "cuda"] if not torch.cuda.is_available() else ["--recipe", "nope"],
     "CUDA is not available" if not torch.cuda.is_available() else "invalid choice"),
])
def test_train_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    full = ["train", "--data", CIFAR, "--output", str(tmp_path / "x"), "--model-args", TINY_ARGS, "--limit", "32",
            "--batch-size", "16", "--workers", "0", "--quiet", *argv]
    try:
        code = main(full)
    except SystemExit as exit_info:  # argparse's own checks
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tokenpace: error:") and message in err[0], err
    assert not (tmp_path / "x").exists()  # nothing written


def test_recipes_check_their_own_settings():
    import dataclasses

    from tokenpace.errors import TokenpaceError

    for field, value in (("cut_weight", -1.0), ("distill_weight", float("inf")), ("epochs", 0), ("lr", 0.0),
                         ("cut_mode", "all"), ("objective", "magic")):
        with pytest.raises(TokenpaceError, match=field.replace("_", "_")):
            dataclasses.replace(get_recipe("idle-finetune"), **{field: value})


def test_evo_modes_in_training_and_in_evaluation():
    """evo-scratch runs layer mode for 2/3 of the epochs and is evaluated in stage mode; a fine-tune keeps the mode
    it was given in both (a layer-mode fine-tune was evaluated and exported in stage mode)."""
    import dataclasses

    from tokenpace.methods import Evo
    from tokenpace.train.loop import inference_method, method_for_epoch

    scratch = get_recipe("evo-scratch")
    assert [method_for_epoch(scratch, e, 3).mode for e in range(3)] == ["layer", "layer", "stage"]
    assert inference_method(scratch).mode == "stage"
    finetune = dataclasses.replace(get_recipe("finetune"), method=Evo(mode="layer"))
    assert method_for_epoch(finetune, 0, 3).mode == inference_method(finetune).mode == "layer"


def test_malformed_data_and_foreign_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4)))
    common = ["train", "--output", str(tmp_path / "y"), "--model-args", TINY_ARGS, "--batch-size", "16",
              "--workers", "0", "--quiet"]
    assert main(common + ["--recipe", "dense", "--data", str(bad)]) == 2
    assert "is not a packed-JPEG .npz: missing keys" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1).state_dict(), str(other))
    assert main(common + ["--recipe", "finetune", "--data", CIFAR, "--limit", "32", "--init", str(other)]) == 2
    assert "does not fit model" in capsys.readouterr().err
    garbage = tmp_path / "y" / "last.pth"
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(b"not a checkpoint")
    assert main(common + ["--recipe", "dense", "--data", CIFAR, "--limit", "32", "--resume"]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err


def test_imagenet_style_folder_through_timm_create_dataset(tmp_path):
    src = PackedJpegDataset(CIFAR, "val", limit=40)
    for i in range(len(src)):
        img, label = src[i]
        for split in ("train", "val"):
            folder = tmp_path / "imgs" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i}.png")
    cfg = _config(tmp_path, epochs=1)
    cfg.data = DataSpec(str(tmp_path / "imgs"))
    history = train(cfg)
    assert history[0]["epoch"] == 1 and 0 <= history[0]["val_top1"] <= 100
    run = json.load(open(os.path.join(cfg.output, "run.json")))
    assert run["model_args"]["num_classes"] == 10  # read off the folder's class names


def test_cli_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--recipe", "dense", "--data", "x", "--output", "y", "--bogus", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenpace: error: unrecognized arguments: --bogus 1") and "\n" not in err


def test_train_builds_the_model_the_configuration_beside_the_checkpoint_names(tmp_path, capsys):
    """W.safetensors with W.json beside it (as `tokenpace convert` writes): train builds that model with its
    arguments (flags override them), says so, and still trains the recipe's method; --model that differs is refused."""
    from safetensors.torch import save_file

    from tokenpace.cli import train as train_cli

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY)
    weights = str(tmp_path / "w.safetensors")
    save_file(model.state_dict(), weights)
    tokenpace.save_config(tokenpace.Idle(keep=0.5), str(tmp_path / "w.json"), model="vit_tiny_patch16_224",
                          model_args=TINY)
    argv = ["train", "--data", CIFAR, "--output", str(tmp_path / "run"), "--recipe", "finetune", "--checkpoint",
            weights, "--model-args", "drop_path_rate=0.1"]
    cfg = train_cli.config(make_parser().parse_args(argv))
    assert cfg.model == "vit_tiny_patch16_224" and cfg.init == weights
    assert cfg.model_args == {**TINY, "drop_path_rate": 0.1} and cfg.recipe.name == "finetune"
    assert "w.json (beside the checkpoint)" in capsys.readouterr().err
    with pytest.raises(tokenpace.errors.TokenpaceError, match="--model deit_small_patch16_224 differs"):
        train_cli.config(make_parser().parse_args([*argv, "--model", "deit_small_patch16_224"]))


def test_weight_decay_spares_biases_norms_and_the_models_no_weight_decay_names():
    """timm's rule (DeiT's recipe): decay on weight matrices only; none on 1-D parameters (biases, norms) or on
    the names a model lists in ``no_weight_decay()`` (pos_embed, cls_token), the evo-scratch auxiliary head's
    too."""
    from tokenpace.train.loop import param_groups
    from tokenpace.train.objectives import EvoScratchObjective

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                              depth=2, global_pool="avg")
    objective = EvoScratchObjective(model, torch.nn.CrossEntropyLoss(), 0.5)
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for g in param_groups(objective, 0.05) if g["weight_decay"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in param_groups(objective, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert {"model.pos_embed", "model.cls_token", "model.fc_norm.weight", "model.blocks.0.attn.qkv.bias",
            "aux_head.0.weight", "aux_head.1.bias"} <= spared
    assert all(n.endswith(".weight") and objective.get_parameter(n).ndim > 1 for n in decayed)
    assert {"model.patch_embed.proj.weight", "model.blocks.1.mlp.fc2.weight", "aux_head.1.weight"} <= decayed

"""Bad input: a clear exception naming the value and what is accepted; the CLI turns it into one line, exit 2."""
import subprocess
import sys

import pytest
import timm
import torch

import tokenpace
from tokenpace.cli import main
from conftest import CIFAR, make_vit, needs_cifar


@pytest.mark.parametrize("method", ["evo", "idle", "evit", "topk"])
@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.01, 2, "0.5", True, float("nan")])
def test_keep_outside_zero_one(method, keep):
    with pytest.raises(ValueError, match=r"keep must be a number in \(0, 1\]"):
        tokenpace.apply(make_vit("deit", depth=6), method, keep=keep)


@pytest.mark.parametrize("method,options,match", [
    ("evo", {"stage_starts": (4, 12)}, r"outside the model: accepted layers are 1\.\.11"),
    ("evo", {"stage_starts": (0, 8)}, r"outside the model: accepted layers are 1\.\.11"),
    ("evo", {"stage_starts": (8, 4)}, "strictly increasing"),
    ("evo", {"stage_starts": ("4", 8)}, r"must be layer indices \(an int or a tuple of ints\)"),
    ("idle", {"stage_starts": (3, 6, 13)}, r"outside the model: accepted layers are 0\.\.11"),
    ("evit", {"layers": (-1, 6)}, r"outside the model"),
    ("topk", {"layer": 12}, r"outside the model"),
    ("topk", {"layer": 0}, r"accepted layers are 1\.\.11"),
    ("evo", {"mode": "block"}, r"mode='block' is not accepted; choose one of 'stage', 'layer'"),
    ("evo", {"alpha": 0}, r"alpha must be a number in \(0, 1\]"),
    ("evo", {"representative": "yes"}, "representative must be True, False or None"),
    ("idle", {"score": "max"}, r"score='max' is not accepted; choose one of 'cls', 'received', 'norm', 'random'"),
    ("evit", {"fuse": 1}, "fuse must be True or False"),
    ("idle", {"ratio": 0.5}, r"unknown option.*accepted: keep, stage_starts, score, project_keys"),
    ("dynamicvit", {}, r"unknown method 'dynamicvit'; accepted: evit, evo, idle, topk"),
])
def test_bad_options_name_the_value_and_what_is_accepted(method, options, match):
    with pytest.raises(ValueError, match=match):
        tokenpace.apply(make_vit("deit"), method, **options)


@pytest.mark.parametrize("method", ["evo", "idle", "evit", "topk"])
def test_class_score_on_a_model_without_class_token(method):
    model = make_vit("deit", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=f"{method} score='cls' is not available for timm VisionTransformer models; "
                                         "accepted here: 'received'"):
        tokenpace.apply(model, method, score="cls")
    assert tokenpace.get_patch(model) is None


@pytest.mark.parametrize("model", [torch.nn.Linear(3, 3), timm.create_model("resnet10t", num_classes=2)])
def test_unsupported_models_raise_type_error_naming_the_families(model):
    with pytest.raises(TypeError, match="is not a supported model; tokenpace supports: timm VisionTransformer"):
        tokenpace.apply(model, "idle")
    with pytest.raises(TypeError, match="not a supported model"):
        tokenpace.macs(model)


def test_compile_wrappers_and_non_modules_are_refused_by_apply_and_remove():
    """A torch.compile wrapper keeps the forward it traced: remove on it did nothing, silently."""
    model = tokenpace.apply(make_vit("deit", depth=2), "idle")
    compiled = torch.compile(model)
    for call in (lambda: tokenpace.apply(compiled, "evo"), lambda: tokenpace.remove(compiled)):
        with pytest.raises(TypeError, match="torch.compile wrapper.*apply or remove the method on the model first"):
            call()
    assert tokenpace.get_patch(model) is not None
    with pytest.raises(TypeError, match="patches a torch.nn.Module \\(a timm model\\); got str"):
        tokenpace.remove("model")


def test_unsupported_vit_block_type():
    from timm.models.vision_transformer import Block

    model = make_vit("deit", depth=4)
    model.blocks[2].__class__ = type("MyBlock", (Block,), {})  # a subclass may compute anything: refused
    with pytest.raises(TypeError, match="block 2 of this VisionTransformer is MyBlock.*supports timm's pre-norm Block"):
        tokenpace.apply(model, "evo")


def test_unsupported_blocks_pools_and_classes_name_what_is_accepted():
    from timm.models.eva import Eva
    from timm.models.vision_transformer import ParallelThingsBlock

    parallel = make_vit("deit", depth=2, block_fn=ParallelThingsBlock, attn_layer="diff")  # no timm model has it
    with pytest.raises(TypeError, match="block 0 of this VisionTransformer is ParallelThingsBlock with "
                                        "DiffAttention; tokenpace supports timm's pre-norm Block .*"
                                        "ParallelThingsBlock with the standard Attention"):
        tokenpace.apply(parallel, "idle")
    from timm.models.eva import EvaBlock

    own = Eva(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    own.blocks[1].__class__ = type("MyEvaBlock", (EvaBlock,), {})
    with pytest.raises(TypeError, match="block 1 of this Eva is MyEvaBlock.*supports timm's EvaBlock or "
                                        "EvaBlockPostNorm"):
        tokenpace.apply(own, "evo")
    pooled = make_vit("deit", depth=2)
    pooled.global_pool = "gem"
    with pytest.raises(TypeError, match="global_pool='gem'.*accepted: 'token', 'avg', 'avgmax', 'max', 'map', ''"):
        tokenpace.apply(pooled, "idle")
    with torch.device("meta"):  # ConViT (gated positional self-attention): another class
        convit = timm.create_model("convit_tiny")
    with pytest.raises(TypeError, match="is not a supported model; tokenpace supports: timm VisionTransformer"):
        tokenpace.apply(convit, "idle")


def test_attention_masks_are_refused_on_a_patched_model():
    model = tokenpace.apply(make_vit("deit", depth=4), "idle")
    with pytest.raises(ValueError, match="attention masks"):
        model(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(65, 65))


TINY_TOWER = "img_size=32,patch_size=4,embed_dim=32,depth=2,num_heads=2"  # a VLM tower's encoder


@pytest.mark.parametrize("argv,message", [
    (["bench", "--methods", "evo@1.5"], "Evo keep must be a number in (0, 1]"),
    (["bench", "--methods", "dense,fast"], "unknown method 'fast' in --methods; accepted: dense, evit, evo, idle, topk"),
    (["bench", "--model", "no_such_model"], "unknown timm model 'no_such_model'"),
    (["bench", "--model", "resnet10t"], "is not a supported model"),
    (["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--model", "x"], "accepted"),
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "depth"], "--model-args entry 'depth' must be"),
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=32", "--img-size", "64"],
     "--img-size 64 and --model-args img_size=32 differ"),
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "no_such_arg=1"],
     "model 'vit_tiny_patch16_224' cannot be built with {'no_such_arg': 1}"),
    (["bench", "--model", "evo_levit_cifar", "--pretrained"], "evo_levit_cifar has no pretrained weights"),
    (["bench", "--pretrained", "--checkpoint", "x.pth"], "--pretrained and --checkpoint/--run both give the weights"),
    (["bench", "--model", "resnet10t", "--methods", "dense,evo"], "is not a supported model"),
    (["bench", "--model", "swin_tiny_patch4_window7_224", "--img-size", "32", "--methods", "dense,evo"],
     "method 'evo' is not available for timm SwinTransformer models (it needs a sequence layout"),
    (["bench", "--model", "vit_tiny_patch16_224", "--methods", "evo:stage_starts=2/13"],
     "has layer(s) [13] outside the model"),
    (["eval", "--model", "resnet10t", "--data", "x.npz"], "is not a supported model"),
    (["eval", "--data", "x.npz", "--plot", "p.png"], "--plot draws a keep sweep; add --keep-sweep"),
    (["bench", "--model", "vit_tiny_patch16_224", "--fuse-bn"], "--fuse-bn folds LeViT's BatchNorm layers"),
    (["train", "--recipe", "dense", "--data", "x.npz", "--output", "/tmp/x", "--cut-mode", "none"],
     "--cut-mode sets a loss of the idle-finetune recipe; recipe 'dense' has no such loss"),
    (["show", "x.png", "--model", "vit_tiny_patch16_224", "--method", "evo", "--keep", "0.5", "--mode", "layer",
      "--output", "/dev/null"], "--output '/dev/null' is a file"),
    (["bench", "--methods", "evo:mode=block"], "mode='block' is not accepted"),
    (["bench", "--methods", "evo:score=norm"], "Evo score='norm' is not accepted; choose one of 'cls', 'received', "
                                               "'random'"),  # refused by the config, not blamed on the model
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "depth=4", "--methods", "topk:layer=0"],
     "TopK layer=0 is outside the model: accepted layers are 1..3 for a model of depth 4"),
    (["bench", "--model", "vit_tiny_patch16_224", "--methods", "idle@0.1"],
     "idle keep=0.1 on this timm VisionTransformer model: a block would run on no token"),
    (["bench", "--checkpoint", "/no/such/file.pth"], "checkpoint '/no/such/file.pth' does not exist"),
    (["bench", "--checkpoint", "/tmp"], "checkpoint '/tmp' is a folder; accepted: a .safetensors or torch"),
    (["bench", "--config", "/tmp"], "configuration file '/tmp' is a folder; accepted: a JSON file"),
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "depth=0", "--methods", "dense"],
     "VisionTransformer has no transformer blocks (depth 0)"),
    (["bench", "--json", "/proc/x.json"], "--json '/proc/x.json' is in folder '/proc', which is not writable"),
    (["bench", "--json", "/no/such/x.json"], "is in folder '/no/such', which does not exist"),
    (["show", "x.png", "--output", "/dev/null/sub"], "--output '/dev/null/sub' cannot be created: '/dev/null' is a file"),
    (["train", "--recipe", "dense", "--data", "x.npz", "--output", "/proc/x"],
     "--output '/proc/x' cannot be written: folder '/proc' is not writable"),
    (["eval", "--data", "x.npz", "--keep-sweep", "0.5:0.7:0.1", "--plot", "noext"],
     "--plot 'noext' has no file type suffix; accepted: "),
    (["eval", "--data", "x.npz", "--keep-sweep", "0.5:0.7:0.1", "--plot", "p.xyz"],
     "--plot 'p.xyz' has a file type matplotlib cannot write (.xyz); accepted: "),
    (["eval", "--data", "x.npz", "--model", "qwen3_vit_88m_enc", "--model-args", TINY_TOWER],
     "model qwen3_vit_88m_enc has no classifier (num_classes=0): it returns features, not class logits"),
    pytest.param(["train", "--recipe", "dense", "--data", CIFAR, "--limit", "16", "--output",
                  "/tmp/tokenpace_encoder_run", "--overwrite", "--model", "deepseek_vit_412m_enc", "--model-args",
                  TINY_TOWER + ",out_features=8"],
                 "model deepseek_vit_412m_enc has no classifier (num_classes=0): it returns features, not class "
                 "logits", marks=needs_cifar),
    (["tune", "--data", "x.npz", "--output", "/tmp/tokenpace_encoder_tune", "--model", "qwen3_vit_88m", "--model-args",
      TINY_TOWER], "model qwen3_vit_88m has no classifier (num_classes=0)"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenpace: error:") and message in err and "\n" not in err


def test_out_of_range_integers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--runs", "0"])
    assert exit_info.value.code == 2
    assert "argument --runs: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_cli_has_no_traceback_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "tokenpace.cli", "bench", "--methods", "idle@0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Idle keep" in proc.stderr


def test_numpy_keep_and_a_single_stage_start_are_accepted(capsys):
    import numpy as np

    model = make_vit("deit", depth=6)
    tokenpace.apply(model, "idle", keep=np.float32(0.5), stage_starts=3)
    config = tokenpace.get_patch(model).config
    assert config.keep == 0.5 and type(config.keep) is float and config.stage_starts == (3,)
    assert tokenpace.Idle(keep=np.float32(0.7)).keep == 0.7  # the value meant, not 0.699999988079071
    assert tokenpace.Idle(keep=np.float16(0.7)).keep == 0.7
    tokenpace.apply(model, "evo", keep=np.float64(0.5), stage_starts=[2, 4])
    assert tokenpace.get_patch(model).config.stage_starts == (2, 4)
    argv = ["bench", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=4", "--batch-size",
            "1", "--runs", "1", "--warmup", "0", "--methods", "dense,evo:stage_starts=4", "--quiet"]
    assert main(argv) == 0
    assert "stage_starts=(4,)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["evo", "topk"])
def test_methods_that_need_a_block_before_them_refuse_a_one_block_model(method):
    """Evo and top-k select by the attention of an earlier block: at depth 1 there is none, said as such (not as
    an empty 'accepted layers 1..0' range of a layer the user never gave)."""
    with pytest.raises(ValueError, match="a model of depth 1 has no layer this method can act at .accepted layers "
                                         r"start at 1.; it needs at least 2 blocks"):
        tokenpace.apply(make_vit("deit", depth=1), method)


def test_a_run_json_that_is_not_an_object_is_named_on_resume(tmp_path, capsys):
    (tmp_path / "run.json").write_text("[]")
    assert main(["train", "--output", str(tmp_path), "--resume"]) == 2
    assert "run.json is not a run description (a JSON object" in capsys.readouterr().err


def test_an_output_through_a_broken_symbolic_link_names_the_missing_folder(tmp_path, capsys):
    """An output path is written through a symbolic link, so the folder checked is the one the link points into."""
    link = tmp_path / "bench.json"
    link.symlink_to("/no/such/bench.json")
    assert main(["bench", "--json", str(link)]) == 2
    assert "is in folder '/no/such', which does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["deit", "eva02", "naflex_siglip"])
def test_patch_dropout_is_refused_on_every_flat_timm_class(variant):
    """Patch dropout changes the token count before the blocks (timm keeps it as an Identity, None or a module)."""
    from backbones import make_backbone

    model = make_vit("deit", depth=2, patch_drop_rate=0.1) if variant == "deit" else make_backbone(
        variant, depth=2, patch_drop_rate=0.1)
    with pytest.raises(TypeError, match=r"patch dropout \(patch_drop_rate > 0\) changes the token count"):
        tokenpace.apply(model, "idle")
    tokenpace.apply(make_vit("deit", depth=2) if variant == "deit" else make_backbone(variant, depth=2), "idle")


def test_forward_features_takes_what_the_class_takes(monkeypatch):
    """An argument the model's own forward_features does not take is a TypeError, None or not, as unpatched; the
    masks it does take pass when they ask for nothing, without binding the signature (timm's forward names them)."""
    from timm.models.swin_transformer import SwinTransformer

    import tokenpace.patch

    vit = tokenpace.apply(make_vit("deit", depth=2), "idle")
    swin = tokenpace.apply(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,),
                                           window_size=4, num_classes=10).eval(), "idle")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with monkeypatch.context() as patched:
            patched.setattr(tokenpace.patch, "_bound_arguments", None)  # the common call must not bind
            assert torch.equal(vit(images), vit.forward_head(vit.forward_features(images)))
        for model in (vit, swin):
            with pytest.raises(TypeError, match="colour"):
                model.forward_features(images, colour=None)
        with pytest.raises(TypeError, match="attn_mask"):  # Swin's forward_features takes no mask
            swin.forward_features(images, attn_mask=None)
        with pytest.raises(TypeError, match="attn_mask"):
            tokenpace.remove(swin).forward_features(images, attn_mask=None)


def test_modules_replaced_after_apply_are_refused_until_apply_runs_again():
    """The forward is built from the blocks and attentions the model had at apply: a block, its attention, a norm
    inside it or the block container put in their place later would be left out, so the forward refuses it, naming
    the fix."""
    import copy

    from timm.models.swin_transformer import SwinTransformer

    images = torch.randn(2, 3, 32, 32)
    vit = make_vit("deit", depth=4)
    swin = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
                           num_classes=10).eval()
    replacements = [
        (vit, lambda: setattr(vit.blocks[2], "attn", copy.deepcopy(vit.blocks[2].attn)),
         "block 2's attn \\(Attention\\)"),
        (vit, lambda: vit.blocks.__setitem__(1, copy.deepcopy(vit.blocks[1])), "block 1 \\(Block\\)"),
        (vit, lambda: setattr(vit, "blocks", torch.nn.Sequential(*vit.blocks)), "the model's module 'blocks'"),
        (vit, lambda: setattr(vit.blocks[0].attn, "q_norm", torch.nn.Identity()),
         "block 0's attn.q_norm \\(Identity\\)"),
        (swin, lambda: swin.layers[1].blocks.__setitem__(0, copy.deepcopy(swin.layers[1].blocks[0])),
         "block 2 \\(SwinTransformerBlock\\)"),
    ]
    for model, replace, name in replacements:
        tokenpace.apply(model, "idle", keep=1.0)
        with torch.no_grad():
            expected = tokenpace.remove(model)(images)
            tokenpace.apply(model, "idle", keep=1.0)
            replace()
            with pytest.raises(TypeError, match=f"{name} was replaced after tokenpace.apply.*apply\\(model, "
                                                "...\\) again"):
                model(images)
            tokenpace.apply(model, "idle", keep=1.0)  # reads the new modules: the copies compute the same
            assert torch.equal(model(images), expected)

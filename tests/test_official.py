"""Released checkpoints: synthetic files in each official layout (built from random tokenpace / timm weights by the
specs' key maps) load through tokenpace.load_official, patched as trained, and give the logits of the model they
came from; Evo-ViT's DeiT also equals a literal forward on the official keys; errors name the keys and the layout;
convert writes timm keys and a configuration that apply and the CLI accept."""
import os
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import tokenpace
from tokenpace.errors import TokenpaceError
from tokenpace.official import OFFICIAL_ARCHS
from tokenpace.official.layouts import EVO_LEVIT
from conftest import spread_weights
from official_layouts import (EVO_LEVIT_256_SPEC, LVVIT_S_SPEC, deit_training_format, official_evo_deit,
                              parse_listing, to_evo_deit, to_evo_levit)


def source_model(name: str, method: str, keep: float, **options):
    """A randomly initialised (well-spread) model, patched as its official checkpoints were trained."""
    torch.manual_seed(0)
    model = spread_weights(timm.create_model(name), seed=0).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return tokenpace.apply(model, method, keep=keep, **options)


def images(size=224, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_the_writers_produce_the_specs_listings():
    with torch.device("meta"):
        levit, lvvit = timm.create_model("evo_levit_256"), timm.create_model("lvvit_s")
    official = to_evo_levit(levit.state_dict(), (4, 4, 4))
    listed = {k: tuple(v.shape) for k, v in official.items()
              if ".bn." not in k and not k.startswith("stage_blocks.")}
    assert listed == parse_listing(EVO_LEVIT_256_SPEC)
    assert {k: tuple(v.shape) for k, v in lvvit.state_dict().items()} == parse_listing(LVVIT_S_SPEC)
    # tokenpace's map names the same official keys for every tokenpace key
    named = {s.keys[0] for s in EVO_LEVIT.sources(levit).values()}
    assert named == {k for k in official if not k.startswith("stage_blocks.")}


CASES = {  # arch: (tokenpace / timm model, method and the keep its checkpoints run at, writer, image size)
    "evo_deit_tiny_patch16_224": ("evo_deit_tiny_patch16_224", "evo", 0.5, to_evo_deit),
    "EvoLeViT_128S": ("evo_levit_128s", "evo", 0.5, lambda sd: to_evo_levit(sd, (2, 3, 4))),
    "deit_small": ("deit_small_patch16_224", "idle", 0.5, dict),
    "lvvit_s": ("lvvit_s", "idle", 0.6, dict),
}


@pytest.mark.parametrize("arch,form", [("evo_deit_tiny_patch16_224", "pth.tar"), ("EvoLeViT_128S", "pth.tar"),
                                       ("deit_small", "safetensors"), ("lvvit_s", "dict")])
def test_synthetic_official_checkpoints_give_the_source_models_logits(arch, form, tmp_path):
    name, method, keep, writer = CASES[arch]
    model = source_model(name, method, keep)
    official = writer({k: v.clone() for k, v in model.state_dict().items()})
    if form == "pth.tar":  # the DeiT training format the releases use
        checkpoint = str(tmp_path / "release.pth.tar")
        torch.save(deit_training_format(official), checkpoint)
    elif form == "safetensors":  # a bare state dict, named as IdleViT's releases: the keep comes from the name
        checkpoint = str(tmp_path / f"idlevit_{arch}_ratio{keep}.safetensors")
        save_file({k: v.contiguous() for k, v in official.items()}, checkpoint)
    else:  # already loaded, with DDP's prefix
        checkpoint = {"model": {f"module.{k}": v for k, v in official.items()}}
    given = None if form == "safetensors" or keep == OFFICIAL_ARCHS[arch].keep else keep
    loaded = tokenpace.load_official(checkpoint, arch, keep=given)
    assert not loaded.training and type(loaded).__mro__[1] is type(tokenpace.remove(model))
    assert tokenpace.get_patch(loaded).config == tokenpace.get_patch(tokenpace.apply(model, method, keep=keep)).config
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():  # training-only heads included
        assert torch.equal(loaded.state_dict()[key], value), key


def test_evo_deit_equals_the_official_forward_on_the_official_keys():
    model = source_model("evo_deit_tiny_patch16_224", "evo", 0.5)
    official = to_evo_deit(model.state_dict())
    loaded = tokenpace.load_official(official, "evo_deit_tiny_patch16_224")
    x = images()
    with torch.no_grad():
        expected = official_evo_deit(official, x, heads=3)
        got = loaded(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_defaults_per_arch_and_a_bad_keep():
    assert OFFICIAL_ARCHS["EvoLeViT_256_384"].model_args == {"img_size": 384}
    assert OFFICIAL_ARCHS["lvvit_m"].model == "lvvit_m" and OFFICIAL_ARCHS["deit_base"].keep == 0.7
    assert {(a.method, a.keep) for n, a in OFFICIAL_ARCHS.items() if "vo" in n} == {("evo", 0.5)}
    with pytest.raises(TokenpaceError, match="lvvit_s: Idle keep must be a number in"):
        tokenpace.load_official("/never/read.pth", "lvvit_s", keep=1.5)


def test_errors_name_the_arch_the_keys_and_the_layout():
    with pytest.raises(TokenpaceError, match="unknown official arch 'deit_tiny'; accepted .*evo_deit_tiny_patch16_224"
                                             ".*EvoLeViT_128S_384.*lvvit_m"):
        tokenpace.load_official({}, "deit_tiny")
    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224").state_dict()
        lvvit = timm.create_model("lvvit_s").state_dict()
    # an IdleViT DeiT file given for Evo-ViT's arch: the split attention's keys are missing
    with pytest.raises(TokenpaceError, match=r"does not fit evo_deit_small_patch16_224 \(Evo-ViT DeiT layout: .*qks"
                                             r".*\): \d+ missing keys \(norms.0.weight, .*unexpected keys "
                                             r"\(blocks.0.norm1.weight"):
        tokenpace.load_official(deit, "evo_deit_small_patch16_224")
    lvvit["pos_embed"] = torch.zeros(1, 50, 384, device="meta")
    del lvvit["aux_head.bias"]
    with pytest.raises(TokenpaceError, match=r"1 missing keys \(aux_head.bias\); 1 keys of another shape "
                                             r"\(pos_embed \(1, 50, 384\) vs \(1, 197, 384\) expected\)"):
        tokenpace.load_official({"model": lvvit}, "lvvit_s")
    with pytest.raises(TokenpaceError, match="does not exist"):
        tokenpace.load_official("/nonexistent/release.pth", "deit_small")
    with pytest.raises(TokenpaceError, match="no state dict of tensors"):
        tokenpace.load_official({"epoch": 3}, "deit_small")


def test_the_keep_comes_from_the_argument_then_the_file_name_then_the_default():
    from tokenpace.official import checkpoint_keep

    assert checkpoint_keep("/r/idlevit_deit_small_ratio0.5.pth", "deit_small") == (0.5, "the file name")
    assert checkpoint_keep("/r/idlevit_deit_small_ratio0.5.pth", "deit_small", 0.9) == (0.9, "given")
    assert checkpoint_keep("/r/deit_small.pth", "deit_small") == (0.7, "IdleViT's default")
    assert checkpoint_keep({"model": {}}, "lvvit_s") == (0.7, "IdleViT's default")  # a loaded dict has no name
    assert checkpoint_keep("/r/evo_ratio0.7.pth", "EvoLeViT_128S") == (0.5, "Evo-ViT's default")  # Evo: no ratio
    with pytest.raises(TokenpaceError, match=r"deit_small \(the keep ratio its file name states\): Idle keep must be "
                                             r"a number in \(0, 1\] .*got 1.5"):
        tokenpace.load_official("/never/read/idlevit_deit_small_ratio1.5.pth", "deit_small")


def test_convert_writes_timm_keys_and_a_configuration(tmp_path):
    model = source_model("evo_levit_128s", "evo", 0.5)
    release = str(tmp_path / "EvoLeViT_128S.pth")
    torch.save(deit_training_format(to_evo_levit(model.state_dict(), (2, 3, 4))), release)
    dst = str(tmp_path / "evo_levit_128s.safetensors")
    config_path = tokenpace.official.convert(release, dst, "EvoLeViT_128S")
    assert config_path == str(tmp_path / "evo_levit_128s.json") and os.path.isfile(dst)
    config = tokenpace.load_config(config_path)
    assert config == tokenpace.get_patch(model).config and config.representative is True
    rebuilt = timm.create_model("evo_levit_128s")
    rebuilt.load_state_dict(__import__("safetensors.torch").torch.load_file(dst))
    tokenpace.apply(rebuilt.eval(), config)
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(TokenpaceError, match="must end in .safetensors"):
        tokenpace.official.convert(release, str(tmp_path / "out.pth"), "EvoLeViT_128S")


def test_cli_convert_then_commands_pick_up_the_configuration(tmp_path, capsys):
    import json

    from tokenpace.cli import main

    model = source_model("evo_levit_128s", "evo", 0.5)
    release = str(tmp_path / "EvoLeViT_128S.pth")
    torch.save(to_evo_levit(model.state_dict(), (2, 3, 4)), release)  # a bare state dict this time
    dst = str(tmp_path / "converted.safetensors")
    assert main(["convert", release, dst, "--arch", "EvoLeViT_128S"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [dst, str(tmp_path / "converted.json")]
    assert "keep 0.5 (Evo-ViT's default)" in captured.err
    out = str(tmp_path / "bench.json")
    assert main(["bench", "--checkpoint", dst, "--batch-size", "1", "--runs", "1", "--warmup", "0", "--quiet",
                 "--json", out]) == 0
    assert "applying the method configuration beside the checkpoint" in capsys.readouterr().err
    document = json.load(open(out))
    rows = document["results"]
    assert document["model"] == "evo_levit_128s"  # the configuration's model: no --model given
    assert document["config"] == str(tmp_path / "converted.json") and document["checkpoint"] == dst  # what ran
    assert [r["method"] for r in rows] == ["dense", "evo"] and "representative=True" in rows[1]["config"]
    assert main(["bench", "--checkpoint", dst, "--model", "evo_levit_128", "--runs", "1"]) == 2
    assert "differs from the model of configuration" in capsys.readouterr().err
    assert main(["convert", release, str(tmp_path / "c.safetensors"), "--arch", "EvoLeViT_256"]) == 2
    assert "does not fit EvoLeViT_256 (Evo-LeViT layout" in capsys.readouterr().err


def test_convert_refuses_an_existing_destination_and_the_source_itself(tmp_path, capsys):
    from tokenpace.cli import main

    model = source_model("evo_levit_128s", "evo", 0.5)
    release = tmp_path / "EvoLeViT_128S.safetensors"  # a release already in safetensors: DST could name it
    save_file({k: v.contiguous() for k, v in to_evo_levit(model.state_dict(), (2, 3, 4)).items()}, str(release))
    original = release.read_bytes()
    for overwrite in (False, True):  # never the file being converted, even when asked to overwrite
        with pytest.raises(TokenpaceError, match="DST '.*EvoLeViT_128S.safetensors' is the checkpoint being "
                                                 "converted; write the converted file to another path"):
            tokenpace.official.convert(str(release), str(release), "EvoLeViT_128S", overwrite=overwrite)
    os.symlink(release, tmp_path / "link.safetensors")  # the same file by another name
    with pytest.raises(TokenpaceError, match="is the checkpoint being converted"):
        tokenpace.official.convert(str(tmp_path / "link.safetensors"), str(release), "EvoLeViT_128S", overwrite=True)
    assert release.read_bytes() == original

    dst = tmp_path / "out.safetensors"
    (tmp_path / "out.json").write_text("{}")  # the configuration alone is enough to refuse
    with pytest.raises(TokenpaceError, match=r"DST's configuration '.*out.json' already exists; pass overwrite=True "
                                             r"\(--overwrite on the command line\)"):
        tokenpace.official.convert(str(release), str(dst), "EvoLeViT_128S")
    assert not dst.exists() and (tmp_path / "out.json").read_text() == "{}"
    tokenpace.official.convert(str(release), str(dst), "EvoLeViT_128S", overwrite=True)
    assert tokenpace.load_config(str(tmp_path / "out.json")) == tokenpace.get_patch(model).config
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        tokenpace.official.convert(str(release), str(dst), "EvoLeViT_128S", overwrite="yes")

    capsys.readouterr()
    assert main(["convert", str(release), str(dst), "--arch", "EvoLeViT_128S"]) == 2
    assert "DST '" + str(dst) + "' already exists; pass overwrite=True (--overwrite" in capsys.readouterr().err
    dst.write_bytes(b"not weights")
    assert main(["convert", str(release), str(dst), "--arch", "EvoLeViT_128S", "--overwrite"]) == 0
    assert __import__("safetensors.torch").torch.load_file(str(dst)).keys() == model.state_dict().keys()
    assert capsys.readouterr().out.split() == [str(dst), str(tmp_path / "out.json")]
    assert main(["convert", str(release), str(release), "--arch", "EvoLeViT_128S", "--overwrite"]) == 2
    assert "is the checkpoint being converted" in capsys.readouterr().err and release.read_bytes() == original


def test_evo_levit_duplicates_must_each_repeat_a_key_read():
    """The official tree holds every module twice; a stage_blocks entry that equals no key read (edited, or from
    another checkpoint) or that has no twin at all is refused, naming it."""
    model = source_model("evo_levit_128s", "evo", 0.5)
    official = to_evo_levit(model.state_dict(), (2, 3, 4))
    tokenpace.load_official(dict(official), "EvoLeViT_128S")  # every duplicate equals its twin: accepted
    edited = dict(official)
    key = next(k for k in official if k.startswith("stage_blocks.") and k.endswith("qkv.c.weight"))
    edited[key] = official[key] + 1e-3
    with pytest.raises(TokenpaceError, match=r"does not fit EvoLeViT_128S \(Evo-LeViT layout: .*\): 1 duplicate keys "
                                             r"\(stage_blocks\.\*\) equal to no key read \(" + re.escape(key) + r"\); "
                                             "the official code registers each of these modules twice"):
        tokenpace.load_official(edited, "EvoLeViT_128S")
    extra = {**official, "stage_blocks.99.m.qkv.c.weight": torch.randn(3, 2)}
    with pytest.raises(TokenpaceError, match=r"1 duplicate keys .* \(stage_blocks.99.m.qkv.c.weight\)"):
        tokenpace.load_official(extra, "EvoLeViT_128S")
    renamed = {**official, "stage_blocks.99.m.qkv.c.weight": official[key].clone()}  # a twin under any name is one
    tokenpace.load_official(renamed, "EvoLeViT_128S")


def test_evaluation_crops_follow_the_official_code():
    """Evo-ViT's DeiT at 224 and 384 px: resize 256/224 x size, centre crop (evovit.md §8). IdleViT's LV-ViT
    checkpoints: IdleViT's own 256/224 evaluation, recorded where they are converted; LV-ViT built directly keeps
    its authors' crop."""
    from tokenpace.data import data_config, eval_transform

    with torch.device("meta"):
        for img in (224, 384):
            deit = timm.create_model(f"evo_deit_tiny_patch16_{img}")
            assert data_config(deit)["crop_pct"] == 0.875
            resize = eval_transform(deit).transforms[0]
            assert resize.size == int(img * 256 / 224)  # 256 at 224 px, 438 at 384 px
        assert timm.create_model("lvvit_s").pretrained_cfg["crop_pct"] == 0.9
        assert timm.create_model("lvvit_m").pretrained_cfg["crop_pct"] == 1.0
    assert OFFICIAL_ARCHS["lvvit_s"].model_args == OFFICIAL_ARCHS["lvvit_m"].model_args == {"crop_pct": 0.875}
    model = source_model("lvvit_s", "idle", 0.7)
    loaded = tokenpace.load_official(dict(model.state_dict()), "lvvit_s")
    assert data_config(loaded)["crop_pct"] == 0.875


def test_official_architectures_refuse_a_pool_or_shape_they_cannot_run():
    from tokenpace.archs import EvoLevit

    deit = timm.create_model("evo_deit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="accepted global_pool: 'avg' .*got 'token'"):
        deit.reset_classifier(10, "token")
    assert deit.global_pool == "avg" and deit.head.out_features == 1000  # refused before anything changed
    deit.reset_classifier(10, "avg")
    assert deit.head.out_features == deit.head_cls.out_features == 10

    levit = timm.create_model("evo_levit_cifar", depth=(1, 1, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    levit.reset_classifier(7)
    heads = ("head", "head_dist", "head_cls", "head_cls_dist")
    assert all(getattr(levit, h).linear.out_features == 7 for h in heads) and levit.num_classes == 7
    with torch.no_grad():
        assert levit(x).shape == (2, 7) and all(t.shape == (2, 7) for t in levit.forward_train_heads(
            levit.forward_features(x)))
    assert not levit.head.training  # the new heads take the model's mode
    with pytest.raises(ValueError, match="accepted global_pool: 'avg' .*got 'token'"):
        levit.reset_classifier(10, "token")
    levit.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(levit(x), levit.forward_head(levit.forward_features(x), pre_logits=True))
    assert levit(x).shape == (2, levit.num_features)

    with pytest.raises(ValueError, match=r"img_size must be a positive multiple of the stem stride 16 .*e\.g\. 192 "
                                         r"or 208; got 200"):
        timm.create_model("evo_levit_128s", img_size=200)
    with pytest.raises(ValueError, match=r"embed_dim, depth, num_heads give one value per stage and must be tuples of "
                                         r"the same length .*got embed_dim=\(128, 256, 384\), depth=\(2, 3\)"):
        timm.create_model("evo_levit_128s", depth=(2, 3))
    with pytest.raises(ValueError, match="num_heads=4"):
        EvoLevit(num_heads=4)
    with pytest.raises(ValueError, match="stem stride must be 4, 8 or 16; got 2"):
        EvoLevit(img_size=32, stem_stride=2)

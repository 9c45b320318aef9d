"""Method configuration files (config_io): a round trip into apply gives the same outputs, and a malformed or
mismatched file (another model, unknown method or option, keep out of range, layers the model lacks) is refused
with one line naming the file and the problem."""
import json

import numpy as np
import pytest
import timm
import torch

import tokenpace
from tokenpace.config_io import load_config, load_config_for, model_record, save_config
from tokenpace.errors import TokenpaceError

from conftest import TINY, make_vit


@pytest.fixture(scope="module")
def model():
    return make_vit(depth=6)


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [tokenpace.Evo(keep=0.4, stage_starts=(2, 4), mode="layer"),
                                    tokenpace.Idle(keep=0.6, score="random"), tokenpace.EViT(keep=0.8, fuse=False),
                                    tokenpace.TopK(keep=0.3, layer=2)])
def test_a_config_file_round_trips_into_apply(config, model, tmp_path):
    path = str(tmp_path / "c.json")
    save_config(config, path, note="made by hand")
    assert json.loads(open(path).read())["note"] == "made by hand"
    assert tokenpace.load_config(path) == config
    x = images(2, seed=3)
    with torch.no_grad():
        torch.manual_seed(0)  # the random-score control draws its ranking
        expected = tokenpace.apply(model, config)(x)
        torch.manual_seed(0)
        got = tokenpace.apply(model, tokenpace.load_config(path))(x)
    tokenpace.remove(model)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("text,match", [
    ("not json", "is not JSON"),
    ('["evo"]', 'must hold an object with a "method"'),
    ('{"options": {"keep": 0.5}}', 'must hold an object with a "method"'),
    ('{"method": "fast", "options": {}}', "unknown method 'fast'; accepted: evit, evo, idle, topk"),
    ('{"method": "evo", "options": [0.5]}', '"options" must be an object'),
    ('{"method": "evo", "options": {"keep": 1.5}}', r"Evo keep must be a number in \(0, 1\]"),
    ('{"method": "idle", "options": {"keep": 0}}', r"Idle keep must be a number in \(0, 1\]"),
    ('{"method": "evo", "options": {"speed": 2}}', "unknown option.*accepted: keep, stage_starts"),
])
def test_malformed_config_files_give_clear_errors(text, match, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TokenpaceError, match=match) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TokenpaceError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))


def test_mismatched_config_files_give_clear_errors(model, tmp_path):
    path = str(tmp_path / "c.json")
    save_config(tokenpace.Evo(keep=0.5), path, model="deit_small_patch16_224", depth=12, input_size=[3, 224, 224])
    with pytest.raises(TokenpaceError, match=r"made for another model \(model deit_small_patch16_224, depth 12, "
                                             r"input_size \[3, 224, 224\]; this one has model vit_tiny_patch16_224, "
                                             r"depth 6, input_size \[3, 32, 32\]\)"):
        load_config_for(path, model, "vit_tiny_patch16_224")
    with pytest.raises(TokenpaceError, match=r"made for another model \(model deit_small_patch16_224, depth 12"):
        tokenpace.load_config(path, model, "vit_tiny_patch16_224")  # the public API checks when given the model
    with pytest.raises(TokenpaceError, match=r"made for another model \(depth 12, input_size \[3, 224, 224\]"):
        tokenpace.load_config(path, model)  # no timm name recorded on the model: depth and input size still differ
    with pytest.raises(TypeError, match="pass the model too"):
        tokenpace.load_config(path, name="vit_tiny_patch16_224")
    save_config(tokenpace.Idle(keep=0.5, stage_starts=(3, 9)), path, **model_record(model, "vit_tiny_patch16_224"))
    with pytest.raises(TokenpaceError, match=r"does not run on this model: Idle stage_starts=\(3, 9\) has layer"):
        load_config_for(path, model, "vit_tiny_patch16_224")
    with pytest.raises(TokenpaceError, match=r"does not run on this model: Idle stage_starts=\(3, 9\) has layer"):
        tokenpace.load_config(path, model)


def test_save_config_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="save_config takes a method config .*got str"):
        save_config("evo", str(tmp_path / "c.json"))
    missing = tmp_path / "no" / "c.json"
    with pytest.raises(TokenpaceError, match="folder .* does not exist"):
        save_config(tokenpace.Evo(), str(missing))
    assert not missing.parent.exists()
    with pytest.raises(ValueError, match="must be JSON data .*ndarray"):
        save_config(tokenpace.Evo(), str(tmp_path / "c.json"), measured=np.zeros(2))
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left behind


def test_numpy_layer_indices_are_stored_as_ints(tmp_path):
    config = tokenpace.TopK(keep=0.5, layer=np.int64(2))
    assert type(config.layer) is int and config == tokenpace.TopK(keep=0.5, layer=2)
    save_config(config, str(tmp_path / "t.json"))
    assert load_config(str(tmp_path / "t.json")) == config


def test_a_features_only_model_is_checked_as_the_model_it_wraps(tmp_path):
    net = timm.create_model("vit_tiny_patch16_224", features_only=True, feature_cls="getter", **TINY)
    path = str(tmp_path / "c.json")
    save_config(tokenpace.Idle(keep=0.5), path, **model_record(net, "vit_tiny_patch16_224"))
    assert json.load(open(path))["depth"] == TINY["depth"]
    config = tokenpace.load_config(path, net, "vit_tiny_patch16_224")
    assert tokenpace.get_patch(tokenpace.apply(net, config)).config.keep == 0.5


def test_a_file_recorded_with_a_pretrained_tag_fits_the_untagged_model(model, tmp_path):
    path = str(tmp_path / "c.json")
    record = model_record(model, "vit_tiny_patch16_224")
    save_config(tokenpace.Evo(keep=0.5), path, **{**record, "model": "vit_tiny_patch16_224.augreg_in21k"})
    assert tokenpace.load_config(path, model, "vit_tiny_patch16_224").keep == 0.5  # same architecture
    with pytest.raises(TokenpaceError, match="made for another model"):
        tokenpace.load_config(path, model, "vit_small_patch16_224")


def test_writers_write_through_a_symbolic_link(model, tmp_path):
    """A configuration file and exported weights written to a symbolic link replace the file it points to and keep
    the link (the temporary file goes beside that file), as ``open`` writes through one; the output check looks in
    the same folder."""
    from safetensors.torch import load_file

    from tokenpace.outputs import output_file_problem
    from tokenpace.weights import export_safetensors

    (tmp_path / "real").mkdir()
    for name, write in (("c.json", lambda p: save_config(tokenpace.Idle(keep=0.6), str(p))),
                        ("w.safetensors", lambda p: export_safetensors(model, str(p)))):
        target, link = tmp_path / "real" / name, tmp_path / name
        target.write_text("old")
        link.symlink_to(target)
        write(link)
        assert link.is_symlink() and target.read_bytes() != b"old"
        assert {p.name for p in tmp_path.iterdir()} <= {"real", "c.json", "w.safetensors"}  # no temporary file left
        assert {p.name for p in (tmp_path / "real").iterdir()} <= {"c.json", "w.safetensors"}
    assert load_config(str(tmp_path / "c.json")) == tokenpace.Idle(keep=0.6)
    assert torch.equal(load_file(str(tmp_path / "real" / "w.safetensors"))["pos_embed"], model.pos_embed)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "missing" / "c.json")
    assert output_file_problem(str(dangling)) == f"is in folder {str(tmp_path / 'missing')!r}, which does not exist"

"""ONNX export: one model per family, patched with a method, exported with the batch dynamic, and ONNX Runtime's
logits equal PyTorch's (max abs difference <= 1e-4) at batch 1 and 8; the CLI command; exports that cannot be done
are refused with a clear error."""
import json
import os

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="torch.onnx's exporter needs onnx: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install -e '.[onnx]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="the ONNX Runtime check needs onnxruntime: pip install -e "
                                  "'.[onnx]'")

import tokenpace  # noqa: E402
from tokenpace.cli import main  # noqa: E402
from tokenpace.errors import TokenpaceError  # noqa: E402
from tokenpace.onnx_export import _verify, run_onnx  # noqa: E402
from backbones import make_backbone  # noqa: E402
from conftest import make_vit  # noqa: E402
from test_cait import make_cait  # noqa: E402
from test_davit import make_davit  # noqa: E402
from test_volo import make_volo  # noqa: E402
from test_xcit import make_xcit  # noqa: E402
from test_hiera import make_hiera  # noqa: E402
from test_hieradet import make_hieradet  # noqa: E402
from test_tiny_vit import make_tiny_vit  # noqa: E402
from test_pit import make_pit  # noqa: E402
from test_maxvit import make_maxvit  # noqa: E402
from test_gemma4_vit import make_tower as make_gemma  # noqa: E402
from test_vlm_vit import make_tower  # noqa: E402
from test_levit import make_levit  # noqa: E402
from test_lvvit import make_lvvit  # noqa: E402
from test_pvt_v2 import make_pvt  # noqa: E402
from test_sam import make_sam  # noqa: E402
from test_swin import make_swin  # noqa: E402


def _explicit_softmax(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def _explicit_dense_sam():
    model = make_sam("padded", depth=3, global_attn_indexes=(2,))
    model.blocks[0].attn.fused_attn = False
    return model


def _explicit_stage_entry(model):
    model.blocks[1].attn.fused_attn = False
    return model


# family: (a small model, the method exported on it); each method's own graph ops appear once at least: one selecting
# block past a dense one (the exporter's time grows with the blocks, 6-12 s for two, 13-21 s for four)
FAMILIES = {
    "vit": (lambda: make_vit("deit", depth=2), ("evit", {})),
    "eva": (lambda: make_backbone("eva02", depth=2), ("idle", {})),
    # timm's Beit and VisionTransformerRelPos blocks export with the explicit softmax only (fused_attn False):
    # torch.onnx fails to decompose their SDPA with the bias (a view of the transposed output), unpatched as well
    "beit": (lambda: _explicit_softmax(make_backbone("beit_both_swiglu", depth=2)), ("evo", {"representative": True})),
    "vit_relpos": (lambda: _explicit_softmax(make_backbone("relpos_cls_shared_table", depth=2)), ("evit", {})),
    "naflexvit": (lambda: make_backbone("naflex_radio", depth=2), ("evo", {})),
    "vit_diff": (lambda: make_backbone("diff_token_qknorm", depth=2), ("evit", {})),
    "cait": (lambda: make_cait(depth=2, depth_token_only=1), ("idle", {"stage_starts": (1,), "keep": 0.5})),
    "xcit": (lambda: make_xcit(depth=2), ("idle", {"stage_starts": (1,), "keep": 0.5})),
    "volo": (lambda: make_volo(layers=(1, 1, 1, 1)), ("idle", {"stage_starts": (1,), "keep": 0.5})),
    "davit": (lambda: make_davit(depths=(1, 1)), ("idle", {"stage_starts": (1,), "keep": 0.5})),
    "levit": (lambda: make_levit("levit_cifar", depth=(1, 1, 1)), ("evo", {})),
    "evo_levit": (lambda: make_levit("evo_levit_cifar", depth=(1, 1, 1)), ("evo", {})),
    "levit_conv": (lambda: make_levit("levit_cifar", depth=(1, 1, 1), use_conv=True), ("idle", {})),
    "swin": (lambda: make_swin("padded"), ("idle", {})),  # padded windows, shifted, dynamic mask
    "swin_v2": (lambda: make_swin("v2_padded", depths=(2,), num_heads=(2,)), ("idle", {})),
    "swin_v2_cr": (lambda: make_swin("cr_padded", depths=(2,), num_heads=(2,)), ("idle", {})),
    "pvt_v2": (lambda: make_pvt("sr", depths=(1, 1, 1, 1)), ("idle", {})),
    # timm's dense windowed block (explicit softmax: its fused attention does not export, unpatched too), then a
    # windowed block (padded windows) and a global one idling, fused, with the bias
    "sam": (lambda: _explicit_dense_sam(), ("idle", {"stage_starts": (1,)})),
    "lvvit": (lambda: make_lvvit(depth=2), ("idle", {"keep": 0.5})),
    # a windowed block idling (fused), a windowed stage entry that pools (timm's, dense: explicit softmax, as its
    # fused attention on 5-D windows does not export, unpatched too), a global block idling (fused)
    "hiera": (lambda: _explicit_stage_entry(make_hiera(stages=(1, 2), q_pool=1, mask_unit_attn=(True, False))),
              ("idle", {"stage_starts": (0,)})),
    # at its 224 px: a windowed block idling, a pooling stage entry (timm's, dense), windows of 8 on 28x28 (padded:
    # padding keys masked) and a global block, idling
    "hieradet": (lambda: make_hieradet(stages=(1, 3), q_pool=1, window_spec=(4, 8), global_att_blocks=(3,)),
                 ("idle", {"stage_starts": (0,)})),
    # at its 224 px: an MBConv block and timm's windowed block (dense, fused attention with its biases), then one
    # idling (biases gathered, the local convolution)
    "tiny_vit": (lambda: make_tiny_vit(depths=(1, 2), embed_dims=(16, 32), num_heads=(1, 2), window_sizes=(4, 4)),
                 ("idle", {"stage_starts": (2,)})),
    # a distilled PiT, one block a stage: Evo selects after the first pooling (its global attention sub-sampled at
    # the kernels' centres) and again after the second, with the representative token
    "pit": (lambda: make_pit("distilled", depth=(1, 1, 1)), ("evo", {"stage_starts": (1,), "representative": True})),
    # one MaxViT block: an MBConv (dense), then window and grid attention idling with RelPosMlp's bias
    "maxvit": (lambda: make_maxvit("rmlp", depths=(1,), embed_dim=(16,)), ("idle", {"stage_starts": (1,)})),
    # CoAtNet: an MBConv stage, a strided transformer block (dense), one over the whole map idling (NCHW layers on
    # the selected tokens' (B, C, k, 1) map)
    "coatnet": (lambda: make_maxvit("coatnet", depths=(1, 2)), ("idle", {"stage_starts": (2,)})),
    # the VLM towers with their projectors: Qwen's merger after Evo, DeepSeek's padded aligner after Idle
    "qwen3_vit": (lambda: make_tower("qwen_enc", depth=2), ("evo", {"stage_starts": (1,)})),
    "deepseek_vit": (lambda: make_tower("deepseek_cls_align", depth=2), ("idle", {"stage_starts": (1,)})),
    # Gemma 4's encoder (its own forward patched): one-hot position rows, 2D RoPE, grouped keys, the soft pooler
    # after Idle (not the clamped projections: timm's own clamped tower exports an unsorted graph, unpatched too)
    "gemma4_vit": (lambda: make_gemma("enc_soft_gqa", depth=2), ("idle", {"stage_starts": (1,)})),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_runtime_equals_pytorch_at_batch_1_and_8(family, tmp_path):
    build, (method, options) = FAMILIES[family]
    model = tokenpace.apply(build(), method, **options)
    path = str(tmp_path / f"{family}.onnx")
    result = tokenpace.export_onnx(model, path)
    assert set(result.max_abs_diff) == {1, 8} and max(result.max_abs_diff.values()) <= 1e-4
    graph = onnx.load(path)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == result.opset == 18
    if family == "vit":  # a file of another opset than asked for (the exporter's failed conversion) is refused
        with pytest.raises(TokenpaceError, match="could not convert the graph to opset 19 \\(the file declares 18\\)"):
            _verify(path, 19)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic
    size = result.input_size
    images = torch.randn(3, *size)  # a batch size neither checked nor traced
    with torch.no_grad():
        expected = model(images)
    assert (run_onnx(path, images) - expected).abs().max() <= 1e-4
    assert tokenpace.get_patch(model) is not None and not model.training  # the model is left as it was


@pytest.mark.parametrize("family", ["beit", "sam", "hiera"])
def test_fused_attention_that_does_not_export_names_the_fix(family, tmp_path):
    """torch.onnx cannot decompose fused SDPA with BEiT's bias in timm's own block, nor convert SAM's SDPA on 3-D
    tensors or Hiera's on 5-D windows (unpatched models too): the error says what to change."""
    build = {"beit": lambda: make_backbone("beit", depth=4),
             "sam": lambda: make_sam("padded", depth=2, global_attn_indexes=(1,)),
             "hiera": lambda: make_hiera(stages=(1, 2), q_pool=1, mask_unit_attn=(True, False))}[family]
    model = tokenpace.apply(build(), "idle", **({} if family == "beit" else {"stage_starts": (1,)}))
    with pytest.raises(TokenpaceError, match="could not export this TokenPace.*set fused_attn = False"):
        tokenpace.export_onnx(model, str(tmp_path / f"{family}.onnx"))


def test_cli_export_bench_onnx_and_refusals(tmp_path, capsys):
    out = str(tmp_path / "vit.onnx")
    assert main(["export", "--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=4,depth=2",
                 "--method", "topk@0.5", "--onnx", out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: topk keep=0.5, opset 18" in printed and "at batch 8" in printed
    bench = str(tmp_path / "bench.json")
    assert main(["bench", "--onnx", "--model", "vit_tiny_patch16_224", "--model-args",
                 "img_size=32,patch_size=4,depth=2", "--methods", "dense,topk@0.5", "--batch-size", "2", "--runs", "1",
                 "--warmup", "0", "--quiet", "--json", bench]) == 0
    document = json.load(open(bench))
    assert document["onnx"] is True and document["onnxruntime"] == onnxruntime.__version__
    assert [r["method"] for r in document["results"]] == ["dense", "topk"]
    assert main(["bench", "--onnx", "--compile", "--model", "vit_tiny_patch16_224"]) == 2
    assert "--onnx times fp32 ONNX Runtime sessions on the CPU; --compile does not apply" in capsys.readouterr().err
    model = make_vit("deit", depth=6)
    with pytest.raises(TokenpaceError, match="ranks tokens at random"):
        tokenpace.export_onnx(tokenpace.apply(model, "idle", score="random"), str(tmp_path / "r.onnx"))
    newest = __import__("onnx").defs.onnx_opset_version()
    for opset in (16, newest + 1):
        with pytest.raises(TokenpaceError, match=f"opset must be an integer from 17 to {newest}"):
            tokenpace.export_onnx(model, str(tmp_path / "o.onnx"), opset=opset, check=())
    for check in ((0,), None):
        with pytest.raises(TokenpaceError, match=r"check must be batch sizes \(positive integers"):
            tokenpace.export_onnx(model, str(tmp_path / "o.onnx"), check=check)
    assert not (tmp_path / "o.onnx").exists()  # refused before anything was written
    assert main(["export", "--model", "vit_tiny_patch16_224", "--onnx", str(tmp_path / "x.pt")]) == 2
    assert "--onnx must name a file ending in .onnx" in capsys.readouterr().err
    assert main(["export", "--model", "vit_tiny_patch16_224", "--method", "dense,evo",
                 "--onnx", str(tmp_path / "y.onnx")]) == 2
    assert "--method takes one configuration" in capsys.readouterr().err


def test_a_failed_export_leaves_the_existing_file_as_it_was(tmp_path, monkeypatch):
    import tokenpace.onnx_export as onnx_export

    model = make_vit("deit", depth=2)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"a good export")
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # every check fails: the graph is written, then rejected
    with pytest.raises(TokenpaceError, match=r"differ from PyTorch's .* at batch 1 \(tolerance -1\); '.*m\.onnx' was "
                       r"left as it was, the rejected graph is at '.*m\.onnx\.rejected/m\.onnx' for inspection"):
        tokenpace.export_onnx(model, str(path), check=(1,))
    assert path.read_bytes() == b"a good export"
    onnx.checker.check_model(str(tmp_path / "m.onnx.rejected" / "m.onnx"))  # the rejected graph, whole
    monkeypatch.undo()

    def crash(*args, **kwargs):
        raise RuntimeError("exporter crashed")
    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(TokenpaceError, match="could not export this VisionTransformer: RuntimeError: exporter crashed"):
        tokenpace.export_onnx(model, str(path), check=())
    assert path.read_bytes() == b"a good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.rejected"]  # no staging folder left
    monkeypatch.undo()

    link = tmp_path / "link.onnx"  # through a symbolic link: the file it points to is written, the link kept
    link.symlink_to(path)
    result = tokenpace.export_onnx(model, link, check=(1,))  # a good export replaces the file
    assert result.max_abs_diff[1] <= 1e-4 and onnx.load(str(path)).graph.input[0].name == "images"
    assert link.is_symlink() and os.readlink(link) == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "m.onnx"]  # the earlier rejected graph too


def test_exporter_errors_are_one_line_without_terminal_colour_codes():
    from tokenpace.onnx_export import _first_line

    err = RuntimeError("\x1b[1m\x1b[31mFailed to decompose\x1b[0m the graph\nTraceback (most recent call last): ...")
    assert _first_line(err) == "RuntimeError: Failed to decompose the graph"

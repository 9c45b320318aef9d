"""tokenpace.listing: what each timm model accepts, built on the meta device, with one-line reasons."""
from tokenpace.listing import check_model, format_support, list_support, summarize


def _by_name(rows):
    return {r.name: r for r in rows}


def test_supported_and_refused_models_with_reasons():
    rows = _by_name(list_support("deit_small_patch16_224") + list_support("swin_tiny_patch4_window7_224")
                    + list_support("vit_pwee") + list_support("swinv2_tiny_window8")
                    + list_support("samvit_base") + list_support("swinv2_cr_small_224") + list_support("siglip_224")
                    + list_support("dinov3") + list_support("cait_xxs24_224") + list_support("hiera_*")
                    + list_support("sam2_hiera_*") + list_support("tiny_vit_*")
                    + list_support("pit_*") + list_support("maxvit_*") + list_support("maxxvit")
                    + list_support("coatnet_0_rw_224") + list_support("qwen3_vit_*")
                    + list_support("deepseek_vit_*") + list_support("gemma4_vit_*") + list_support("xcit_nano_*")
                    + list_support("volo_*") + list_support("davit_*"))
    assert rows["deit_small_patch16_224.fb_in1k"].accepted() == ["evo", "idle", "evit", "topk"]
    swin = rows["swin_tiny_patch4_window7_224.ms_in1k"]
    assert swin.model_class == "SwinTransformer" and swin.accepted() == ["idle"]
    assert "needs a sequence layout" in swin.refusals["evo"]
    pwee = rows["vit_pwee_patch16_reg1_gap_256.sbb_in1k"]
    assert pwee.accepted() == ["evo", "idle", "evit", "topk"]  # a parallel block
    assert rows["swinv2_tiny_window8_256.ms_in1k"].accepted() == ["idle"]
    assert rows["swinv2_cr_small_224.sw_in1k"].accepted() == ["idle"]
    sam = rows["samvit_base_patch16.sa1b"]
    assert sam.model_class == "VisionTransformerSAM" and sam.accepted() == ["idle"]
    assert "needs a sequence layout" in sam.refusals["evo"]
    convit = check_model("convit_tiny").refusals["idle"]  # a class no family runs
    assert convit == "no tokenpace family runs ConVit models"  # one line, not the families' list
    xcit = [r for name, r in rows.items() if name.startswith("xcit_")]  # no token-to-token attention: Idle by norm
    assert len(xcit) == 6 and all(r.model_class == "Xcit" and r.accepted() == ["idle"] for r in xcit)
    assert "ranks tokens by 'cls' or 'received', and timm Xcit models offer 'norm', 'random'" in xcit[0].refusals["evo"]
    davit = [r for name, r in rows.items() if name.startswith("davit_")]  # windows, then channel attention
    assert len(davit) == 5 and all(r.model_class == "DaVit" and r.accepted() == ["idle"] for r in davit)
    volo = [r for name, r in rows.items() if name.startswith("volo_")]  # outlookers, then transformer blocks
    assert len(volo) == 11 and all(r.model_class == "VOLO" and r.accepted() == ["evo", "idle", "evit", "topk"]
                                   for r in volo)
    cait = rows["cait_xxs24_224.fb_dist_in1k"]  # talking heads, then class attention
    assert cait.model_class == "Cait" and cait.accepted() == ["evo", "idle", "evit", "topk"]
    hiera = [r for name, r in rows.items() if name.startswith("hiera_")]  # mask units, pooling stage entries
    assert len(hiera) == 16 and all(r.model_class == "Hiera" and r.accepted() == ["idle"] for r in hiera)
    assert "needs a sequence layout" in hiera[0].refusals["evo"]
    sam2 = [r for name, r in rows.items() if name.startswith("sam2_hiera_")]  # SAM 2's image encoder
    assert len(sam2) == 8 and all(r.model_class == "HieraDet" and r.accepted() == ["idle"] for r in sam2)
    tiny = [r for name, r in rows.items() if name.startswith("tiny_vit_")]  # a convolutional stage, then windows
    assert len(tiny) == 11 and all(r.model_class == "TinyVit" and r.accepted() == ["idle"] for r in tiny)
    pit = [r for name, r in rows.items() if name.startswith("pit_")]  # stages of ViT blocks joined by pooling
    assert len(pit) == 8 and all(r.model_class == "PoolingVisionTransformer" and r.accepted() == ["evo", "idle"]
                                 for r in pit)
    assert "down-sample a full grid between stages" in pit[0].refusals["evit"]
    maxvit = [r for name, r in rows.items() if name.startswith(("maxvit_", "maxxvit"))]  # window and grid attention
    assert len(maxvit) == 36 and all(r.model_class == "MaxxVit" and r.accepted() == ["idle"] for r in maxvit)
    coatnet = rows["coatnet_0_rw_224.sw_in1k"]  # the same class: stand-alone convolution and transformer blocks
    assert coatnet.model_class == "MaxxVit" and coatnet.accepted() == ["idle"]
    towers = [r for name, r in rows.items() if name.startswith(("qwen3_vit_", "deepseek_vit_"))]  # VLM encoders
    assert len(towers) == 45 and all(r.accepted() == ["evo", "idle"] for r in towers)
    assert {r.model_class for r in towers} == {"Qwen3VitClassifier", "Qwen3VitEncoder", "DeepseekVitClassifier",
                                               "DeepseekVitEncoder"}
    assert "features are the whole patch map" in towers[0].refusals["topk"]
    gemma = {name.split(".")[0]: r for name, r in rows.items() if name.startswith("gemma4_vit_")}  # Gemma 4's tower
    assert sorted(gemma) == ["gemma4_vit_167m", "gemma4_vit_167m_enc", "gemma4_vit_570m", "gemma4_vit_570m_enc"]
    for name, r in gemma.items():  # the classifier's head averages what is left; the encoder's pooler needs it all
        assert r.accepted() == (["evo", "idle"] if name.endswith("_enc") else ["evo", "idle", "evit", "topk"]), name
    assert "pools the patch tokens by their positions into soft tokens" in gemma["gemma4_vit_167m_enc"].refusals["evit"]
    siglip = [r for name, r in rows.items() if name.startswith("vit_base_patch16_siglip_224")]
    dinov3 = [r for name, r in rows.items() if "dinov3" in name]
    assert siglip and dinov3 and all(r.accepted() == ["evo", "idle", "evit", "topk"] for r in siglip + dinov3)


def test_tokenpace_models_and_formatting():
    rows = list_support("levit", pretrained=False)
    names = {r.name for r in rows}
    assert {"evo_levit_256", "levit_cifar", "levit_256", "levit_conv_256"} <= names
    table = format_support(rows)
    conv = next(r for r in rows if r.name == "levit_conv_256")
    assert conv.accepted() == ["evo", "idle"]  # the NCHW layout of levit_256
    assert next(line for line in table.splitlines() if line.startswith("levit_conv_256 ")).count("yes") == 2
    assert next(r for r in rows if r.name == "evo_levit_256").accepted() == ["evo", "idle"]
    summary = summarize(rows).splitlines()
    assert summary[-1].split()[:2] == ["all", str(len(rows))]
    xcit = format_support([check_model("xcit_nano_12_p16_224")]).splitlines()[-1]  # one reason, said once
    assert xcit.endswith("evo/evit/topk: not available for timm Xcit models (it ranks tokens by 'cls' or 'received', "
                         "and timm Xcit models offer 'norm', 'random'); accepted here: 'idle'")


def test_models_command(tmp_path, capsys):
    import json

    from tokenpace.cli import main

    path = tmp_path / "models.json"
    assert main(["models", "deit_small_patch16_224", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "deit_small_patch16_224.fb_in1k" in out and out.strip().splitlines()[-1].split()[0] == "all"
    listed = json.loads(path.read_text())
    assert listed[0]["refusals"] == {"evo": None, "idle": None, "evit": None, "topk": None}
    assert main(["models", "no_such_model_anywhere"]) == 2
    assert "no timm model of the ViT-like families matches" in capsys.readouterr().err

"""scripts/gpu_kernel_profile.py (where a GPU forward's kernel time goes) and cuDNN autotuning around timed runs."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_kernel_kinds import category, run_categories, table  # noqa: E402
from gpu_kernel_profile import main  # noqa: E402


def test_categories_of_the_h200_kernel_names():
    """Names as the H200 profile recorded them: the patch embedding's cuDNN kernels are the conv, not GEMMs."""
    assert category("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN") == "gemm"
    assert category("void implicit_convolve_sgemm<__nv_bfloat16, __nv_bfloat16, 128, 5, 5>(int)") == "conv"
    assert category("void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6, 7>(int)") == "conv"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert category("triton_per_fused__to_copy_add_native_layer_norm_view_14") == "triton"
    assert category("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>") == "norm"
    assert category("void at::native::vectorized_gather_kernel<16, long>(char*)") == "index"
    assert category("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>>") == \
        "elementwise"
    assert category("Memset (Device)") == "other"
    # cuBLAS's matrix-vector kernels, torch's batched products, cuDNN's implicit-GEMM convolutions, arange
    assert category("std::enable_if<true, void>::type internal::gemvx::kernel<int, int, __nv_bfloat16>") == "gemm"
    assert category("aten::bmm") == category("aten::baddbmm") == category("aten::addmm") == "gemm"
    assert category("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"
    assert category("void at::native::elementwise_kernel_with_index<int, arange_functor>(int)") == "elementwise"
    assert category("aten::index_select") == category("aten::index") == "index"


def test_table_of_the_committed_h200_profile():
    """The README's kernel table, from the committed file: the conv column holds the stem's 0.97 ms in every row."""
    doc = json.loads((ROOT / "docs/gpu/2026-12-04-h200-check/kernels.json").read_text())
    lines = table(doc).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["dense", "evo", "idle", "topk"]
    conv = header.index("conv")
    assert {r[conv] for r in rows.values()} == {"0.97"}
    # the kinds, moved to the current patterns, still add up to the kernel total (each was rounded to 1 us)
    for run in doc["runs"]:
        assert abs(sum(run_categories(run, doc.get("categories_version", 1)).values()) - run["total_ms"]) < 0.01


def test_smoke_profiles_each_method_eager_and_compiled(tmp_path, capsys):
    assert main(["--smoke", "--methods", "dense,evo", "--compiled", "evo", "--calls", "1", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert [(r["method"], r["mode"]) for r in doc["runs"]] == [("dense", "eager"), ("evo", "eager"),
                                                                 ("evo", "compiled")]
    for run in doc["runs"]:
        assert run["wall_ms"] > 0 and run["total_ms"] > 0 and run["launches"] > 0
        assert abs(sum(c["ms"] for c in run["categories"].values()) - run["total_ms"]) < 0.01
    # the reduced forward does what dense does and more: its own gathers and scatters show as "index"
    assert "index" in doc["runs"][1]["categories"] and "index" not in doc["runs"][0]["categories"]
    assert "evo" in capsys.readouterr().out
    # a file of the current patterns renders its recorded kinds as they are
    assert doc["categories_version"] == 2 and all("kind" in row for row in doc["runs"][0]["top"])
    assert main(["--table", str(tmp_path / "kernels.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["dense", "evo", "evo"]
    with pytest.raises(SystemExit):
        main([])  # neither an output folder nor --table


def test_cudnn_autotuned_sets_the_flag_on_cuda_only_and_restores_it():
    from tokenpace.runtime import cudnn_autotuned

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with cudnn_autotuned(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        try:
            with cudnn_autotuned("cuda"):  # setting the flag needs no GPU
                assert torch.backends.cudnn.benchmark is True
                raise KeyError("inside")
        except KeyError:
            pass
        assert torch.backends.cudnn.benchmark is False  # back, after an error too
    finally:
        torch.backends.cudnn.benchmark = before


def test_benchmark_times_under_cudnn_autotuning(monkeypatch):
    """tokenpace.bench.benchmark (and its train variant) run inside cudnn_autotuned for their device."""
    import timm

    import tokenpace.bench as bench

    seen = []
    real = bench.cudnn_autotuned

    def spy(device):
        seen.append(torch.device(device).type)
        return real(device)

    monkeypatch.setattr(bench, "cudnn_autotuned", spy)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4)
    bench.benchmark(model, bench.parse_methods("dense"), 2, torch.device("cpu"), runs=1, warmup=0)
    bench.benchmark_train(model, bench.parse_methods("dense"), 2, torch.device("cpu"), runs=1, warmup=0)
    assert seen == ["cpu", "cpu"]

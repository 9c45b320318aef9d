"""scripts/call_overhead.py: the per-call overhead benchmark behind the README's batch-1 table."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from call_overhead import main  # noqa: E402


def test_prints_every_method_against_dense(capsys):
    rows = main(["--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=8,depth=4,embed_dim=24",
                 "--methods", "dense,idle:stage_starts=1/2,topk", "--rounds", "1", "--calls", "2"])
    assert [r["method"] for r in rows] == ["dense", "idle", "topk"] and all(r["ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "of dense" in out and "1.00x" in out


def test_compiled_rows_count_generated_kernels(capsys):
    """aot_eager traces each configuration as inductor would, and generates no kernel: every count is 0."""
    rows = main(["--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=8,depth=4,embed_dim=24",
                 "--methods", "dense,idle:stage_starts=1/2", "--rounds", "1", "--calls", "2", "--compile",
                 "--compile-backend", "aot_eager"])
    assert [r["method"] for r in rows] == ["dense", "idle"] and [r["kernels"] for r in rows] == [0, 0]
    out = capsys.readouterr().out
    assert "compiled (aot_eager)" in out and "kernels" in out


def test_refuses_empty_rounds():
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])

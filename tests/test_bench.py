"""The benchmark command: table, JSON layout, method parsing."""
import json
import subprocess
import sys

import pytest

from tokenpace.bench import MethodSpec, parse_methods
from tokenpace.cli import main


def test_parse_methods():
    specs = parse_methods("dense, evo@0.6, idle:keep=0.5:stage_starts=2/4/6, evit:fuse=false")
    assert [s.method for s in specs] == ["dense", "evo", "idle", "evit"]
    assert dict(specs[1].options) == {"keep": 0.6}
    assert dict(specs[2].options) == {"keep": 0.5, "stage_starts": (2, 4, 6)}
    assert dict(specs[3].options) == {"fuse": False}
    assert specs[3].describe() == "keep=0.7 fuse=False" and MethodSpec("dense").describe() == "-"
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("evo:mode")


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "vit_tiny_patch16_224", "--methods", "dense,evo,idle,evit,topk", "--batch-size", "2",
               "--runs", "1", "--warmup", "0", "--img-size", "64", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "speed-up" in printed.out and "[run 1/1] idle" in printed.err
    doc = json.loads(out.read_text())
    assert doc["model"] == "vit_tiny_patch16_224" and doc["batch_size"] == 2 and doc["device"].startswith("cpu")
    rows = doc["results"]
    assert [r["method"] for r in rows] == ["dense", "evo", "idle", "evit", "topk"]
    assert rows[0]["speedup"] == 1.0 and all(r["img_per_s"] > 0 and r["gmacs"] > 0 for r in rows)
    assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:])
    assert {"method", "config", "gmacs", "img_per_s", "speedup"} <= set(rows[1])


def test_bench_several_batch_sizes_write_a_list(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "vit_tiny_patch16_224", "--methods", "dense,topk", "--batch-size", "1,2", "--runs", "1",
                 "--warmup", "0", "--img-size", "32", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [d["batch_size"] for d in doc] == [1, 2]


def test_training_specs_take_idle_recipe_options():
    spec = parse_methods("idle:distill_weight=0:cut_mode=none", train=True)[0]
    assert spec.method_options() == {} and spec.recipe_options() == {"distill_weight": 0, "cut_mode": "none"}
    assert spec.describe() == "keep=0.7 distill_weight=0 cut_mode=none"
    with pytest.raises(ValueError, match="use it with --train"):
        parse_methods("idle:distill_weight=0")
    with pytest.raises(ValueError, match="accepted on idle only"):
        parse_methods("evit:cut_mode=none", train=True)
    with pytest.raises(ValueError, match="choose one of both, intra, inter, none"):
        parse_methods("idle:cut_mode=all", train=True)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        parse_methods("idle:cut_weight=-1", train=True)


def test_train_bench_without_teacher(capsys):
    assert main(["bench", "vit_tiny_patch16_224", "--train", "--methods", "dense,idle,idle:distill_weight=0",
                 "--batch-size", "2", "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet"]) == 0
    assert "distill_weight=0" in capsys.readouterr().out


def test_malloc_keep_is_recorded_and_other_values_refused(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # a separate process: mallopt would change this test process's allocator for good
    run = subprocess.run([sys.executable, "-m", "tokenpace.cli", "bench", "vit_tiny_patch16_224", "--methods", "dense",
                          "--batch-size", "1", "--runs", "1", "--warmup", "0", "--img-size", "32", "--quiet",
                          "--malloc", "keep", "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["malloc"] == "keep" and "malloc=keep" in run.stdout
    with pytest.raises(SystemExit):
        main(["bench", "--malloc", "jemalloc"])
    assert "choose from 'system', 'keep'" in capsys.readouterr().err

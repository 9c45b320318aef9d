"""scripts/bytes_moved.py: the traffic counter behind the README's bytes-per-image table."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bytes_moved import TrafficCounter, main  # noqa: E402


def test_counter_counts_what_a_call_reads_and_writes_and_skips_views():
    x = torch.randn(4, 6, 8)
    counter = TrafficCounter()
    with counter:
        x.view(24, 8).transpose(0, 1)  # views: no traffic
        y = x + 1  # reads x, writes y
    assert counter.bytes == 2 * x.numel() * 4 and y.shape == x.shape
    rows, src = torch.tensor([0, 5, 9]), torch.randn(3, 8)
    counter = TrafficCounter()
    with counter:
        x.view(24, 8).index_select(0, rows)  # the gathered rows, read and written (not the whole of x)
        x.view(24, 8).index_copy_(0, rows, src)  # the source's rows, read and written (not the whole of x)
    assert counter.bytes == 2 * (3 * 8 * 4) + 2 * src.numel() * 4


def test_reduced_forwards_move_fewer_bytes_per_image(capsys):
    rows = main(["--model", "vit_tiny_patch16_224", "--model-args", "img_size=32,patch_size=4,depth=4",
                 "--methods", "dense,idle,topk", "--batch-sizes", "1,2"])
    per = {r["method"]: r["mib_per_image"] for r in rows}
    assert 0 < per["idle"] < per["dense"] and 0 < per["topk"] < per["dense"]
    assert "vs dense" in capsys.readouterr().out

"""tokenpace export: the model, dense or with one method, as ONNX, checked against PyTorch with ONNX Runtime."""
from __future__ import annotations

import argparse

from ..errors import TokenpaceError
from . import source


def run(args: argparse.Namespace) -> int:
    from ..bench import configure, spec_config
    from ..onnx_export import CHECK_BATCHES, export_onnx

    if args.amp != "none":
        raise TokenpaceError("ONNX export writes the fp32 graph; --amp applies to bench and eval (accepted here: none)")
    if not args.onnx.endswith(".onnx"):
        raise TokenpaceError(f"--onnx must name a file ending in .onnx; got {args.onnx!r}")
    source.check_output_file(args.onnx, "--onnx")
    device = source.device(args.device)
    model, record = source.build(args)
    args.methods, args.keep_sweep = args.method, None
    if args.methods is None and source.recorded_method(record) is None and args.config is None:
        args.methods = "dense"
    chosen = source.specs(args, model, record)
    if args.method is None:
        chosen = chosen[-1:]  # the recorded method, after the dense row specs() puts first
    if len(chosen) != 1:
        raise TokenpaceError(f"--method takes one configuration; got {len(chosen)} ({args.method})")
    spec = chosen[0]
    configure(model.to(device), spec_config(spec))
    result = export_onnx(model, args.onnx, opset=args.opset, check=() if args.no_check else CHECK_BATCHES)
    what = spec.method if spec.method == "dense" else f"{spec.method} {spec.describe()}"
    print(f"wrote {result.path}: {what}, opset {result.opset}, input 'images' "
          f"(batch, {', '.join(map(str, result.input_size))}) with the batch dynamic, output 'logits'")
    if result.max_abs_diff:
        print("ONNX Runtime vs PyTorch, max |logit difference|: "
              + ", ".join(f"{d:.1e} at batch {b}" for b, d in result.max_abs_diff.items()))
    return 0

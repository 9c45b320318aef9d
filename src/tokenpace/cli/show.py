"""tokenpace show: one PNG per image with the tokens on the full path at each selection."""
from __future__ import annotations

import argparse
import os

from ..errors import user_input
from . import source


def run(args: argparse.Namespace) -> int:
    from ..bench import autocast_for
    from ..data import eval_transform
    from ..patch import apply
    from ..vis import load_image, selection_figure

    source.check_output_folder(args.output, "--output")
    images = [(path, load_image(path)) for path in args.images]  # every input is read before anything is drawn
    device = source.device(args.device)
    model, record = source.build(args)
    method, options = source.show_method(args, model, record)
    with user_input():
        apply(model.to(device), method, **options)
    transform = eval_transform(model)
    os.makedirs(args.output, exist_ok=True)
    described = " ".join(f"{k}={v}" for k, v in options.items())
    for path, image in images:
        with autocast_for(device, args.amp)():
            figure = selection_figure(model, transform(image),
                                      title=f"{os.path.basename(path)}  {method} {described}  (colour: full path)")
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + f"_{method}.png")
        figure.save(out)
        print(out)
    return 0

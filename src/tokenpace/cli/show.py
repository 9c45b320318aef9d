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
    source.note_random_weights(args)
    method, options = source.show_method(args, model, record)
    with user_input():
        apply(model.to(device), method, **options)
    transform = eval_transform(model)
    os.makedirs(args.output, exist_ok=True)
    described = " ".join(f"{k}={v}" for k, v in options.items())
    for (path, image), name in zip(images, output_names(args.images)):
        with autocast_for(device, args.amp)():
            figure = selection_figure(model, transform(image),
                                      title=f"{os.path.basename(path)}  {method} {described}  (colour: full path)")
        out = os.path.join(args.output, f"{name}_{method}.png")
        figure.save(out)
        print(out if name == _stem(path) else f"{out} ({path})")
    return 0


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def output_names(paths: list[str]) -> list[str]:
    """One distinct output name per input: its file stem; where stems repeat (a.png and a.jpg, or x.png in two
    folders; compared case-folded), the extension is added, then a counter no other output uses, so no figure
    overwrites another."""
    folded = [_stem(p).casefold() for p in paths]  # A.png and a.png are one file on some file systems
    names = [f"{_stem(p)}_{os.path.splitext(p)[1].lstrip('.') or 'file'}" if folded.count(f) > 1 else _stem(p)
             for f, p in zip(folded, paths)]
    folded_names = [n.casefold() for n in names]
    unique = [folded_names.count(f) == 1 for f in folded_names]
    taken = {n.casefold() for n, alone in zip(names, unique) if alone}
    out = []
    for name, alone in zip(names, unique):
        if not alone:  # a counter no other output uses
            n = 1
            while f"{name}-{n}".casefold() in taken:
                n += 1
            name = f"{name}-{n}"
            taken.add(name.casefold())
        out.append(name)
    return out

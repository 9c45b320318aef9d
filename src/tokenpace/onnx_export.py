"""ONNX export of a plain or tokenpace-patched model with torch's own exporter (``torch.onnx.export``, the
``torch.export`` path), the batch dimension dynamic, checked against PyTorch with ONNX Runtime.

A patched model exports as it runs: its token counts are fixed per configuration, so the graph is static apart
from the batch; selection becomes ONNX ``TopK`` and ``GatherElements``/``ScatterElements``. Needs the ``onnx`` extra
(``pip install "tokenpace[onnx]"``: onnx, onnxscript for the exporter, onnxruntime for the check).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import TokenpaceError
from .modes import mode_kept
from .outputs import output_file_problem, written_path

MIN_OPSET = 17
DEFAULT_OPSET = 18
CHECK_BATCHES = (1, 8)
TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| on the logits
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which they go to an external data file (protobuf: 2 GB)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its opset, the input it takes ((batch, C, H, W), batch dynamic)
    and, per checked batch size, the max absolute difference of ONNX Runtime's logits from PyTorch's."""

    path: str
    opset: int
    input_size: tuple[int, int, int]
    max_abs_diff: dict[int, float] = field(default_factory=dict)


def _need(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise TokenpaceError(f"ONNX export needs {', '.join(missing)}, not installed here: pip install "
                             "\"tokenpace[onnx]\" (onnx, onnxscript, onnxruntime)")


def _input_size(model: nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int, int]:
    from .families import adapter_for
    from .families.base import parse_img_size

    try:
        chans, *size = adapter_for(model).input_size()
    except TypeError:  # a model tokenpace does not patch still exports dense: its timm config says the input
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg and img_size is None:
            raise TokenpaceError(f"{type(model).__name__} states no input size; pass img_size") from None
        chans, *size = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        size = parse_img_size(img_size)
    return (chans, *size)


def _refusal(model: nn.Module) -> str | None:
    from .patch import get_patch

    patch = get_patch(model)
    if patch is not None and patch.policy.score == "random":
        return ("its method ranks tokens at random (score='random', a control): the graph would draw other random "
                "numbers than PyTorch; export the method with its ranking score")
    return None


def run_onnx(path: str, images: torch.Tensor) -> torch.Tensor:
    """The logits ONNX Runtime (CPU) computes for ``images`` with the model at ``path``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.detach().cpu().float().numpy()})[0])


def export_onnx(model: nn.Module, path: str, *, img_size: int | tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, check: tuple[int, ...] = CHECK_BATCHES) -> OnnxExport:
    """Export ``model`` (as it is now: dense, or patched with a method) to ``path`` for inference.

    The graph is traced in eval mode (the model's mode is restored), takes ``images`` (batch, C, H, W) with the
    batch dynamic and returns ``logits``. ``check``: batch sizes at which ONNX Runtime must match PyTorch within
    1e-4 (``()`` skips the check). TokenpaceError when the export cannot be done (what is missing or refused), or
    when the written graph fails a check: an existing file at ``path`` is then left as it was and the rejected
    graph kept in ``<path>.rejected/`` for inspection (beside the file a symbolic link points to).
    """
    if (not isinstance(check, (tuple, list))
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in check)):
        raise TokenpaceError(f"check must be batch sizes (positive integers; () skips the check); got {check!r}")
    _need("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    import onnx

    newest = onnx.defs.onnx_opset_version()  # what the installed onnx defines
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise TokenpaceError(f"opset must be an integer from {MIN_OPSET} to {newest} (the newest the installed onnx "
                             f"defines); got {opset!r}")
    reason = _refusal(model)
    if reason is not None:
        raise TokenpaceError(f"this {type(model).__name__} cannot be exported: {reason}")
    problem = output_file_problem(path)
    if problem is not None:
        raise TokenpaceError(f"ONNX output {path!r} {problem}")
    size = _input_size(model, img_size)
    param = next(model.parameters())
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    with mode_kept(model), _staged(path) as staged:
        model.eval()
        _export(model, staged, example, opset)
        try:
            diffs = {b: _check(model, staged, size, b, param) for b in check}
        except Exception as err:
            raise TokenpaceError(f"ONNX Runtime could not run the exported graph: {_first_line(err)}") from err
        bad = {b: d for b, d in diffs.items() if not d <= TOLERANCE}
        if bad:
            raise TokenpaceError("ONNX Runtime's logits differ from PyTorch's by "
                                 + ", ".join(f"{d:.2e} at batch {b}" for b, d in bad.items())
                                 + f" (tolerance {TOLERANCE:g})")
    return OnnxExport(path=path, opset=opset, input_size=size, max_abs_diff=diffs)


@contextlib.contextmanager
def _staged(path: str):
    """The path to write the export to: a fresh folder beside ``path`` whose files move into place only when the
    block succeeds, so a failed export leaves an existing file (and its external data) as it was. A graph that was
    written but then rejected moves to ``<file>.rejected/`` beside the file written, and the error says where; a
    success removes such a folder left by an earlier failure. A symbolic link at ``path`` stays one: the file it
    points to is written (a graph over 2 GB whose weights go to a .data file beside it is loaded by that file's own
    path: onnx looks for the data beside the path it is given)."""
    path = os.fspath(path)  # a pathlib.Path too
    target = written_path(path)
    folder, name = os.path.split(target)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    staged = os.path.join(staging, name)
    rejected = target + ".rejected"
    try:
        yield staged
    except TokenpaceError as err:
        if not os.path.exists(staged):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _remove(rejected)
        os.replace(staging, rejected)
        left = f"{path!r} was left as it was" if os.path.exists(path) else f"nothing was written at {path!r}"
        raise TokenpaceError(f"{err}; {left}, the rejected graph is at {os.path.join(rejected, name)!r} for "
                             "inspection") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for entry in os.listdir(staging):  # the graph, and its .data file when the weights went to external data
        os.replace(os.path.join(staging, entry), os.path.join(folder, entry))
    os.rmdir(staging)
    _remove(rejected)  # an earlier failure's graph would now be mistaken for this export's


def _remove(path: str) -> None:
    """Remove a file, a link or a folder at ``path``, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(err: Exception) -> str:
    """An error's type and first line, without the terminal colour codes torch's exporter puts in its messages."""
    text = _ANSI_CODE.sub("", str(err)).strip()
    return f"{type(err).__name__}: " + (text.splitlines() or [""])[0][:300]


def _export(model: nn.Module, path: str, example: torch.Tensor, opset: int) -> None:
    try:
        with torch.no_grad():
            model(example)  # builds the families' per-shape tables with real tensors before tracing sees them
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        # the exporter prints its progress; onnxscript's version converter logs a traceback when it cannot reach
        # the opset, which _verify then reports in one line
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript.version_converter"):
            torch.onnx.export(model, (example,), path, dynamo=True, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=weights > _PROTOBUF_LIMIT)
    except Exception as err:  # the exporter's own failures: say which model and why, in one line
        hint, message = "", str(err)
        fused = any(getattr(m, "fused_attn", False) is True for m in model.modules())
        # timm's own blocks, unpatched too: SDPA with Beit's and VisionTransformerRelPos' bias does not decompose,
        # SAM's attention calls SDPA on 3-D tensors (heads folded into the batch) and Hiera's windowed attention on
        # 5-D ones (windows as an axis), which the converter refuses
        if fused and ("decompose" in message or "only 4D query" in message):
            hint = ("; timm's fused attention in this model's blocks does not export (SDPA with a bias, or on 3-D "
                    "or 5-D tensors); the explicit softmax does: set fused_attn = False on the model's attention modules "
                    "and export again")
        raise TokenpaceError(f"torch.onnx could not export this {type(model).__name__}: {_first_line(err)}"
                             f"{hint}") from err
    _verify(path, opset)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence one logger for the duration (its level restored after)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _verify(path: str, opset: int) -> None:
    """The file declares the opset asked for and passes onnx's checker: where the exporter cannot convert its
    graph to ``opset`` it logs the failure and writes another opset's graph, which may not be valid."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if written != opset:
        raise TokenpaceError(f"torch.onnx could not convert the graph to opset {opset} (the file declares "
                             f"{written}); choose another opset, e.g. {DEFAULT_OPSET} (the default)")
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as err:
        raise TokenpaceError(f"the exported graph is not a valid opset-{opset} model: {_first_line(err)}; "
                             f"choose another opset, e.g. {DEFAULT_OPSET} (the default)") from None


def _check(model: nn.Module, path: str, size: tuple[int, int, int], batch: int, param: torch.Tensor) -> float:
    images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(images.to(param.device, param.dtype)).float().cpu()
    return (run_onnx(path, images) - expected).abs().max().item()

"""What a model family provides: its structure (stages of blocks and the forward around them), the anatomy of each
block (``anatomy.BlockParts``), how its tokens are grouped for selection, and its cost model.

Families name no method. Methods read the structure and the parts, and :class:`SequenceFamily` writes the
selected-token block once for every family whose stage tokens form one sequence.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..anatomy import BlockParts, Frame, StageEntry, TokenSet, check_held, check_projections
from ..blockops import run_block
from ..core.macs import BlockWork, block_macs, dense_work, linear_macs
from ..core.tokens import gather_heads, gather_rows, scatter_rows, sequence_rows, with_prefix
from ..scoring import (QUERIES, bias_row, block_reuses_keys, block_reuses_queries, needs_keys, query_logits,
                       score_macs, token_norms)

SEQUENCE, GROUPED = "sequence", "grouped"
EMBEDDING = -1  # the feature point at the embedding's output, before every block (timm's MaxxVit: its stem)
# ranking criteria: the class token's attention, the attention a token receives, its feature norm, random (control)
SCORES = ("cls", "received", "norm", "random")


@dataclass(frozen=True)
class IntermediateOptions:
    """The formatting arguments of timm's ``forward_intermediates``."""

    norm: bool = False
    output_fmt: str = "NCHW"
    intermediates_only: bool = False
    return_prefix_tokens: bool = False
    output_dict: bool = False

    def only_nchw(self, family: str) -> None:
        """Pyramid and LeViT feature maps come as NCHW grids without prefix tokens, as timm gives them."""
        if self.output_fmt != "NCHW" or self.return_prefix_tokens or self.output_dict:
            raise ValueError(f"{family} feature maps are NCHW grids: accepted output_fmt='NCHW', without "
                             f"return_prefix_tokens or output_dict; got output_fmt={self.output_fmt!r}, "
                             f"return_prefix_tokens={self.return_prefix_tokens}, output_dict={self.output_dict}")


@dataclass(frozen=True)
class GroupCount:
    """Block i's tokens as selection sees them: ``groups`` groups of ``tokens`` patch tokens, each group led by
    ``prefix`` position-less tokens that always take the full path."""

    groups: int
    tokens: int
    prefix: int = 0


def _held_blocks(model: nn.Module, stages) -> list[tuple[dict, str, nn.Module, str]]:
    """What a family's block list copies from the model, for :func:`anatomy.check_held`: each stage's block
    container where the model holds it, and each block in it. Where a stage is a list (cut from one container, as
    Hiera's, or gathered from several, as VOLO's), each block in its own parent and every container above it up to
    the model, once: a container sliced or replaced by hand after ``apply`` is caught too."""
    names = {id(m): name for name, m in model.named_modules()}
    held, index, seen = [], 0, set()

    def hold(path: str, module: nn.Module, label: str) -> None:
        parent, _, attribute = path.rpartition(".")
        held.append((model.get_submodule(parent)._modules, attribute, module, label))

    for blocks in stages:
        if isinstance(blocks, nn.Module):
            if names.get(id(blocks)):
                hold(names[id(blocks)], blocks, f"the model's module {names[id(blocks)]!r}")
            for key, blk in blocks._modules.items():
                held.append((blocks._modules, key, blk, f"block {index} ({type(blk).__name__})"))
                index += 1
            continue
        for blk in blocks:
            path = names.get(id(blk), "")
            if path:
                hold(path, blk, f"block {index} ({type(blk).__name__})")
                while "." in path and (path := path.rpartition(".")[0]) not in seen:
                    seen.add(path)
                    hold(path, model.get_submodule(path), f"the model's module {path!r}")
            index += 1
    return held


class Family(ABC):
    """One model family: structure, block anatomy, selection groups, sizes and cost.

    ``layout`` says what a method may do between blocks: on a "sequence" family the tokens of a stage form one
    sequence that may be gathered, reordered or shortened; on a "grouped" family tokens live in fixed groups
    (attention windows, a map whose keys are spatially reduced) and a block may only run on k chosen tokens of each
    group. ``received_row`` is how the attention a token receives is read while a block runs ("mean": the softmax
    of the mean logit it receives; "columns": the mean of its softmax column, exact, for small token counts).
    """

    name: str = "?"
    layout: str = SEQUENCE
    received_row: str = "mean"
    keys_per_token: bool = True  # each token has its own key (not PVTv2's spatially reduced keys)
    blocks_use_positions: bool = True  # blocks have position terms (RoPE, biases): subsets run through the anatomy
    fixed_length_head: bool = False  # the head needs every token (e.g. an attention pool with position embeddings)
    fixed_length_why: str = "head pools with a position for every token"  # why, in a refusal: "this <name>'s ..."
    owns_forward: bool = False  # the model's forward does not call forward_features: the patch runs it too

    def __init__(self, model: nn.Module, stages: Iterable[Iterable[nn.Module]]) -> None:
        self.model = model
        self.blocks: list[nn.Module] = []
        self.stage_blocks: list[range] = []  # the global indices of each stage's blocks, in order
        stages = list(stages)
        self._held: list = _held_blocks(model, stages)  # the block containers and blocks the list below copies
        for blocks in stages:
            start = len(self.blocks)
            self.blocks.extend(blocks)
            self.stage_blocks.append(range(start, len(self.blocks)))
        self._parts: list[BlockParts] | None = None
        self._projections: list = []  # every block's checked projections, gathered with the anatomy

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this family is the one for ``model`` (its constructor may still reject a variant)."""

    # --- structure -----------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix(self) -> int:
        """Tokens in front of the patch tokens (class, distillation, registers): always on the full path."""
        return 0

    @property
    def has_class_token(self) -> bool:
        return False

    def stage_of_block(self, i: int) -> int:
        return next(s for s, blocks in enumerate(self.stage_blocks) if i in blocks)

    def resamples(self, i: int) -> bool:
        """Block i changes its tokens' count or width (Hiera's stage entries pool and widen them) or mixes every
        position (TinyViT's MBConv blocks), so no token can pass it unchanged: it runs on every token whatever the
        method."""
        return False

    def anatomy(self) -> list[BlockParts]:
        """Every block's anatomy, built once. ``apply`` builds it before any forward: were the first forward of a
        compiled model to build it, the graph's guards would see it change and compile the model a second time."""
        if self._parts is None:
            self._parts = [self.make_parts(i) for i in range(self.depth)]
            self._projections = [p for parts in self._parts for p in parts.projections]
            self._held += [(modules, attribute, module, f"block {i}'s {name} ({type(module).__name__})")
                           for i, parts in enumerate(self._parts) for modules, attribute, module, name in parts.held]
        return self._parts

    def parts(self, i: int) -> BlockParts:
        """The anatomy of block i."""
        return self.anatomy()[i]

    def check_projections(self) -> None:
        """Every block's q/k/v projection is still a plain Linear (TypeError for a wrapper put in after ``apply``,
        e.g. peft's LoRA, whose weights the scores and split projections would read around)."""
        self.anatomy()
        check_projections(self._projections)
        check_held(self._held)

    @abstractmethod
    def make_parts(self, i: int) -> BlockParts: ...

    def scores(self) -> tuple[str, ...]:
        """The ranking criteria this family can give (a method uses those it knows)."""
        return (("cls",) if self.has_class_token else ()) + (("received",) if self.keys_per_token else ()) + (
            "norm", "random")

    def model_defaults(self, method: str) -> dict[str, Any]:
        """Options the model asks for under ``method`` (``tokenpace.defaults``: its own ``tokenpace_defaults``,
        e.g. tokenpace's Evo-LeViT was designed with Evo's representative token, else the measured table)."""
        from ..defaults import model_defaults

        return model_defaults(self.model, method)

    # --- the forward around the blocks ---------------------------------------------------------------------------
    @abstractmethod
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        """Images -> the first block's tokens, and what this forward's position terms need."""

    def feature_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Frame]:
        """:meth:`embed` where feature maps are asked for (``forward_intermediates``): a family whose first feature
        map lies inside its embedding keeps it in the frame here, and only here (VOLO's outlooker stage)."""
        return self.embed(x)

    def enter_stage(self, s: int, x: torch.Tensor, frame: Frame, row: str | None = None):
        """Stage s's down-sampling on every token -> (tokens, the scores ``row`` of the full-resolution patch
        tokens, or None); the identity where a stage has none."""
        return x, None

    def stage_entry(self, s: int, device: torch.device) -> StageEntry | None:
        """How stage s's tokens come from stage s-1's where a down-sampling keeps a token correspondence (LeViT's
        stride-2 attention down-sampling, PiT's stride-2 pooling), else None."""
        return None

    @abstractmethod
    def finish(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The last block's tokens -> what the model's ``forward_features`` returns (``frame``: this forward's grid,
        for a model whose features are a map)."""

    def model_output(self, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The last block's tokens -> what the model's ``forward`` returns, where it does not go through
        ``forward_features`` (``owns_forward``: Gemma 4's encoder pools its tokens after the blocks)."""
        raise NotImplementedError(f"{self.name} models' forward goes through forward_features")

    @abstractmethod
    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        """Block i on every token, exactly as the model runs it."""

    @property
    def checkpointing(self) -> bool:
        """The model asks for gradient checkpointing (``set_grad_checkpointing(True)``)."""
        return bool(getattr(self.model, "grad_checkpointing", False))

    # --- feature maps (forward_intermediates) --------------------------------------------------------------------
    def feature_points(self) -> list[int]:
        """Per feature index of the model's ``forward_intermediates``, the block after which it is taken: the last
        block of each stage (pyramids index stages); ``EMBEDDING`` for a map taken before every block."""
        return [blocks.stop - 1 for blocks in self.stage_blocks]

    @abstractmethod
    def intermediates(self, maps: list[torch.Tensor], final: torch.Tensor, frame: Frame, taken: list[int],
                      stopped: bool, options: "IntermediateOptions"):
        """What the model's ``forward_intermediates`` returns, from the full token maps after the ``taken`` feature
        points and the tokens ``final`` where the run ended (``stopped``: early, after the last point taken)."""

    # --- selection groups ----------------------------------------------------------------------------------------
    @abstractmethod
    def group_size(self, i: int, x: torch.Tensor) -> int:
        """Selectable tokens per group of block i for its input x."""

    @abstractmethod
    def prepare(self, i: int, x: torch.Tensor, frame: Frame) -> Any:
        """What scoring and the selected-token forward of block i share (normed tokens, layout)."""

    @abstractmethod
    def score_shape(self, prep: Any) -> tuple[int, int, int]:
        """(B, G, n): G groups of n selectable tokens."""

    @abstractmethod
    def token_scores(self, i: int, prep: Any, score: str, project_keys: bool = False) -> torch.Tensor:
        """Scores (B, G, n) of every selectable token of its group by ``score`` ("cls", "received", "norm")."""

    @abstractmethod
    def run_selected(self, i: int, x: torch.Tensor, prep: Any, idx: torch.Tensor, keep_qk: bool = False):
        """Block i on the tokens idx (B, G, k) of each group (and every prefix token); every other token passes
        through unchanged. Returns (x, (q, k) of the tokens that ran, or None)."""

    @abstractmethod
    def raster_positions(self, i: int, prep: Any, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, G, k) as raster positions (B, G*k) in block i's grid (what ``trace`` reports; -1: padding)."""

    # --- sizes and cost ------------------------------------------------------------------------------------------
    @abstractmethod
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model is built for."""

    resize_hint = "img_size=N"  # how a fixed-size model of the family is built for another size

    def image_size(self, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
        """(H, W) of ``img_size``, or of the images the model is built for where None."""
        return tuple(self.input_size()[1:]) if img_size is None else parse_img_size(img_size)

    def size_problem(self, size: tuple[int, int]) -> str | None:
        """Why the model cannot run (H, W) inputs, or None when it can. By default a model runs the size it is
        built for only; families whose models resize (dynamic image size, any size) override this."""
        own = tuple(self.input_size()[1:])
        return None if size == own else built_for_only(own, self.resize_hint)

    @abstractmethod
    def block_grid(self, i: int) -> tuple[int, int]:
        """(rows, cols) of block i's token grid at the model's input size (trace indices are raster positions)."""

    @abstractmethod
    def group_counts(self, img_size: int | tuple[int, int] | None) -> list[GroupCount]:
        """Per block, its selection groups at ``img_size`` (None: the model's own)."""

    @abstractmethod
    def count_macs(self, works: list[BlockWork] | None, img_size: int | tuple[int, int] | None) -> int:
        """MACs of one image's forward with these per-block works (None: the dense model)."""

    def block_work_macs(self, i: int, work: BlockWork, groups: int = 1) -> int:
        """Block i's MACs for ``work`` per group in ``groups`` groups, its scores included."""
        parts, score = self.parts(i), work.score
        macs = block_macs(parts.shape(), work)
        if score is not None and score.query in QUERIES:
            macs += score_macs(parts, score)
            if block_reuses_keys(parts, score.project_keys):
                macs -= work.attn_tokens * parts.shape().key_macs()
            if block_reuses_queries(parts, score.query):
                macs -= work.attn_tokens * parts.shape().query_macs()
        return groups * macs


# the hint of models whose position tables follow the grid they are built for (BEiT, RelPos ViT)
FIXED_GRID_RESIZE = "img_size=N, or model.set_input_size(img_size=N)"


def built_for_only(own: tuple[int, int], resize_hint: str = "img_size=N") -> str:
    """The size problem of a model that runs the size it is built for only, with the option that changes it."""
    return f"it is built for {own[0]}x{own[1]} inputs only (build it with {resize_hint} for another size)"


def check_block_classes(blocks: list[nn.Module], Block: type, Attention: type, model_name: str,
                        variants: str) -> None:
    """TypeError naming the first block that is not timm's ``Block`` with its ``Attention`` (SAM's ViT, Hiera,
    HieraDet)."""
    for i, blk in enumerate(blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} of this {model_name} is {type(blk).__name__} with "
                            f"{type(getattr(blk, 'attn', None)).__name__}; tokenpace supports timm's "
                            f"{Block.__name__} with {Attention.__name__} ({variants})")


def no_final_norm_problem(family: str) -> str:
    """The refusal of ``forward_intermediates(norm=True)`` on a model whose timm method ignores ``norm``: it has no
    final norm over its patch tokens (the VLM towers)."""
    return f"{family} has no final norm over its patch tokens: accepted norm=False (timm ignores norm=True here)"


def recorded_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) of the input size in the model's pretrained config (timm's, or the size ``tokenpace.models.create_model``
    recorded there for a model that keeps none of its own), or None."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return None if size is None else (int(size[-2]), int(size[-1]))


def parse_img_size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in img_size)):
        raise ValueError(f"img_size must be a positive int or (height, width); got {img_size!r}")
    return tuple(img_size)


@dataclass
class SequencePrep:
    """One block's shared state on a sequence family: its input, the norm1 output and where the tokens sit."""

    x: torch.Tensor
    h: torch.Tensor
    where: TokenSet
    keys: torch.Tensor | None = None  # every token's keys (B, H, N, d) where scoring had to project them
    queries: torch.Tensor | None = None  # every token's queries (B, H, N, d) where scoring had to project them


class SequenceFamily(Family):
    """Families whose stage tokens form one sequence [prefix tokens, patch tokens in raster order] (ViT, EVA,
    LeViT): selection has one group per image, and a block runs on any subset through its anatomy."""

    layout = SEQUENCE

    def tokens(self, frame: Frame) -> TokenSet:
        """Every token of a stage: the prefix, then every patch in raster order."""
        return TokenSet(prefix=self.num_prefix, frame=frame)

    def group_size(self, i: int, x: torch.Tensor) -> int:
        return x.shape[1] - self.num_prefix

    def prepare(self, i: int, x: torch.Tensor, frame: Frame) -> SequencePrep:
        return SequencePrep(x=x, h=self.parts(i).norm1(x), where=self.tokens(frame))

    def score_shape(self, prep: SequencePrep) -> tuple[int, int, int]:
        return (prep.x.shape[0], 1, prep.x.shape[1] - self.num_prefix)

    def token_scores(self, i: int, prep: SequencePrep, score: str, project_keys: bool = False) -> torch.Tensor:
        prefix = self.num_prefix
        if score == "norm":
            return token_norms(prep.x[:, prefix:]).unsqueeze(1)
        parts, query = self.parts(i), ("cls" if score == "cls" else "mean")
        keys = queries = None
        if needs_keys(parts, project_keys):  # projected anyway: the block reuses the selected tokens' keys
            keys = parts.keys(prep.h, prep.where)
            if block_reuses_keys(parts, project_keys):
                prep.keys = keys
            keys = keys.detach()
        if block_reuses_queries(parts, query):  # every query projected for the mean: the block reuses its own
            prep.queries = parts.queries(prep.h, prep.where)
            queries = prep.queries.detach()
        with torch.no_grad():  # a top-k follows: no gradient flows through scores
            logits = query_logits(parts, prep.h, prep.where, query, project_keys, keys, queries)
            extra = bias_row(parts, prep.where, query)
        if extra is not None:
            logits = logits + extra
        return logits[..., prefix:].unsqueeze(1)

    def run_selected(self, i: int, x: torch.Tensor, prep: SequencePrep, idx: torch.Tensor, keep_qk: bool = False):
        keep = idx[:, 0]
        keys = queries = None
        if prep.keys is not None or prep.queries is not None:  # reused from scoring: the selected tokens' own
            seq = with_prefix(keep, self.num_prefix)
            keys = None if prep.keys is None else gather_heads(prep.keys, seq)
            queries = None if prep.queries is None else gather_heads(prep.queries, seq)
        # once for the block's input, its norm1 output and its output; offsets shared by the forward's selections
        rows = sequence_rows(keep, self.num_prefix, x.shape[1], getattr(prep.where.frame, "cache", None))
        sub, _, qk = run_block(self.parts(i), gather_rows(x, rows), prep.where.select(keep),
                               h=gather_rows(prep.h, rows), keep_qk=keep_qk, keys=keys, queries=queries)
        return scatter_rows(x, rows, sub), qk

    def raster_positions(self, i: int, prep: SequencePrep, idx: torch.Tensor) -> torch.Tensor:
        return idx[:, 0]

    # --- cost ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def stage_patches(self, img_size: int | tuple[int, int] | None) -> list[int]:
        """Patch tokens of every stage at ``img_size``."""

    def group_counts(self, img_size) -> list[GroupCount]:
        patches = self.stage_patches(img_size)
        return [GroupCount(1, patches[s], self.num_prefix) for s, blocks in enumerate(self.stage_blocks)
                for _ in blocks]

    def count_macs(self, works: list[BlockWork] | None, img_size) -> int:
        counts = self.group_counts(img_size)
        if works is None:
            works = [dense_work(c.tokens + c.prefix) for c in counts]
        last = works[-1].out_tokens
        total = self.stem_macs(img_size) + self.head_macs(counts[-1].tokens + counts[-1].prefix if last is None
                                                          else last) + sum(
            self.stage_entry_macs(s, img_size) for s in range(1, len(self.stage_blocks)))
        return total + sum(self.block_work_macs(i, work) for i, work in enumerate(works))

    @abstractmethod
    def stem_macs(self, img_size) -> int: ...

    def stage_entry_macs(self, s: int, img_size) -> int:
        """MACs of stage s's down-sampling (on every token, whatever the method)."""
        return 0

    @abstractmethod
    def head_macs(self, tokens: int) -> int:
        """MACs of the head on the ``tokens`` tokens (prefix included) that leave the last block."""


class StagedSequenceFamily(SequenceFamily):
    """A sequence family whose stages hold patch grids of their own, joined by a down-sampling on the full grid
    (LeViT, PiT): grids from ``resolutions``, the model's own blocks, a classifier head (and a distillation head)
    on the pooled or class token."""

    @abstractmethod
    def resolutions(self, img_size) -> list[tuple[int, int]]:
        """(rows, cols) of every stage's patch grid at ``img_size`` (None: the model's own)."""

    def block(self, i: int, x: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.blocks[i](x)

    def block_grid(self, i: int) -> tuple[int, int]:
        return self.resolutions(None)[self.stage_of_block(i)]

    def stage_patches(self, img_size) -> list[int]:
        return [rows * cols for rows, cols in self.resolutions(img_size)]

    def head_macs(self, tokens: int) -> int:
        return linear_macs(self.model.head) + linear_macs(getattr(self.model, "head_dist", None))

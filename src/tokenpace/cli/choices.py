"""Names the CLI offers and checks before torch and timm are imported (so that --help and argument errors are
instant); tests/test_cli.py keeps them equal to the registries they mirror."""

DEFAULT_MODEL = "deit_small_patch16_224"
METHOD_NAMES = ("evo", "idle", "evit", "topk")  # tokenpace.METHODS
RECIPE_NAMES = ("dense", "evo-scratch", "idle-finetune", "finetune")  # tokenpace.train.RECIPES
CUT_MODES = ("both", "intra", "inter", "none")  # tokenpace.losses.CUT_MODES
AMP = ("none", "bf16", "fp16")  # tokenpace.bench.AMP_DTYPES
DEVICES = ("cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # tokenpace.runners
# tokenpace.official.OFFICIAL_ARCHS: the official code's names of the released checkpoints' models
OFFICIAL_ARCHS = tuple(f"evo_deit_{s}_patch16_{i}" for s in ("tiny", "small", "base") for i in (224, 384)) + tuple(
    f"EvoLeViT_{s}{r}" for s in ("128S", "128", "192", "256", "384") for r in ("", "_384")) + (
    "deit_small", "deit_base", "lvvit_s", "lvvit_m")

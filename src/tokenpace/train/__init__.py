"""Training: recipes (typed configs), objectives (losses per recipe) and the Accelerate loop."""
from .loop import TrainConfig, TrainError, train
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainError", "get_recipe", "train"]

"""``tokenpace tune``: the fastest configuration within an accuracy budget (or the most accurate one that reaches a
speed-up), measured on the user's device and images; its report, plot and configuration file."""
from .search import CheckScore, TuneResult, TuneSettings, tune
from .space import Candidate

__all__ = ["Candidate", "CheckScore", "TuneResult", "TuneSettings", "tune"]

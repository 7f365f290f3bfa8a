"""Predict what a hook buys before running it (:mod:`.model`), from costs measured on the
local machine (:mod:`commcomp.bench.calibrate`); the TernGrad hook's choice of collective
(:mod:`.choice`). Command line: ``commcomp perfmodel`` and ``commcomp calibrate``."""

from .choice import LinkModel, choose, estimate
from .probe import measure_link
from .model import (
    BUILTIN,
    HOOKS,
    TERNARY,
    Prediction,
    Scenario,
    calibration_path,
    choose_collective,
    load_calibration,
    predict,
    table,
    traffic,
)

__all__ = ["BUILTIN", "HOOKS", "LinkModel", "Prediction", "Scenario", "TERNARY", "calibration_path", "choose", "choose_collective", "estimate",
           "load_calibration", "measure_link", "predict", "table", "traffic"]

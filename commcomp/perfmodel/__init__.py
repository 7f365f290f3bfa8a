"""Predict what a hook buys before running it (:mod:`.model`), from costs measured on the
local machine (:mod:`.calibrate`). Command line: ``commcomp perfmodel`` and ``commcomp calibrate``."""

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

__all__ = ["BUILTIN", "HOOKS", "Prediction", "Scenario", "TERNARY", "calibration_path", "choose_collective",
           "load_calibration", "predict", "table", "traffic"]

"""Training objectives, one module per method: each defines an `Objective` subclass and registers it by name.

An objective says what is trained (its phases: parameters stepped by one optimizer each, in order) and returns
a dict of losses for a batch ("loss" is the one differentiated). The loop (training/loop.py) knows no method.
"""

from __future__ import annotations

from .base import Objective, Phase, get_objective, objective_names, register_objective
from .d3sr import D3SRObjective
from .osediff_vsd import OSEDiffVSDObjective
from .regression import RegressionObjective
from .tadsr_hsd import TADSRObjective
from .tsdsr_tsd import TSDSRObjective

__all__ = [
    "D3SRObjective",
    "OSEDiffVSDObjective",
    "Objective",
    "Phase",
    "RegressionObjective",
    "TADSRObjective",
    "TSDSRObjective",
    "get_objective",
    "objective_names",
    "register_objective",
]

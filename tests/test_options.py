"""Options declared once (commcomp.core.options): checks and the checkpoint diff."""

from functools import partial

import pytest

from commcomp.core import Option
from commcomp.core.options import Configurable
from commcomp.utils import validate


class Thing(Configurable):
    OPTIONS = (Option("rate", validate.positive), Option("pieces", partial(validate.integer, low=0)))

    def __init__(self, rate: float = 1.0, pieces: int = 4):
        self._set_options(rate=rate, pieces=pieces)


def test_bad_value_is_refused_before_anything_is_set():
    with pytest.raises(ValueError):
        Thing(rate=2.0, pieces=-1)
    t = Thing()
    with pytest.raises(ValueError):
        t._set_options(rate=3.0, pieces=-1)
    assert t.rate == 1.0 and t.pieces == 4


def test_checkpoint_diff_and_options_added_later():
    Thing(rate=2.0)._check_saved_options({"rate": 2.0, "pieces": 4})
    with pytest.raises(ValueError, match="rate"):
        Thing(rate=3.0)._check_saved_options({"rate": 2.0, "pieces": 4})
    # A checkpoint from before `pieces` existed: fine at the default, refused otherwise.
    Thing(rate=2.0)._check_saved_options({"rate": 2.0})
    with pytest.raises(ValueError, match="pieces"):
        Thing(rate=2.0, pieces=8)._check_saved_options({"rate": 2.0})
    # An option the checkpoint has and this state does not: refused.
    with pytest.raises(ValueError, match="gone"):
        Thing()._check_saved_options({"rate": 1.0, "pieces": 4, "gone": 1})

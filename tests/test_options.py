"""Options declared once (commcomp.core.options): checks and the checkpoint diff."""

from functools import partial

import pytest

from commcomp.core import Option
from commcomp.core.options import Configurable
from commcomp.utils import validate


class Thing(Configurable):
    OPTIONS = (Option("rate", validate.positive), Option("pieces", partial(validate.integer, low=0),
                                                         resume_checked=False))

    def __init__(self, rate: float = 1.0, pieces: int = 4):
        self._set_options(rate=rate, pieces=pieces)


def test_bad_value_is_refused_before_anything_is_set():
    with pytest.raises(ValueError):
        Thing(rate=2.0, pieces=-1)
    t = Thing()
    with pytest.raises(ValueError):
        t._set_options(rate=3.0, pieces=-1)
    assert t.rate == 1.0 and t.pieces == 4


def test_checkpoint_diff():
    Thing(rate=2.0)._check_saved_options({"rate": 2.0, "pieces": 4})
    with pytest.raises(ValueError, match="rate"):
        Thing(rate=3.0)._check_saved_options({"rate": 2.0, "pieces": 4})
    with pytest.raises(ValueError, match="gone"):  # an option this state does not have
        Thing()._check_saved_options({"rate": 1.0, "pieces": 4, "gone": 1})
    with pytest.raises(ValueError, match="rate"):  # a checkpoint without options
        Thing()._check_saved_options({})


def test_options_free_on_resume_may_differ_or_be_absent():
    Thing(pieces=8)._check_saved_options({"rate": 1.0, "pieces": 4})
    Thing(pieces=0)._check_saved_options({"rate": 1.0})  # made before `pieces` existed
    assert Thing(pieces=8).options() == {"rate": 1.0, "pieces": 8}  # still saved
    assert Thing(pieces=8).shared_options()["pieces"] == 8  # and checked across ranks

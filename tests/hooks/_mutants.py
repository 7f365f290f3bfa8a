"""Deliberately wrong hooks, to prove that a test's correctness check can fail.

A mutation test installs one of these through the registry seam (``commcomp.hooks.HOOKS``,
which ``commcomp.register`` reads) inside its spawned workers, trains as the normal test does,
and runs the normal test's check on the result: :func:`expect_caught` requires an
``AssertionError``. The mutants:

- ``"identity"``: returns the bucket unchanged (this rank's own gradient: nothing is
  exchanged). It advances the state's step counter on the last bucket as every hook does, so
  that code that counts steps (``GradientTracking.step``) does not stop it first.
- ``"scaled"``: the real hook's result times 1.1 (a biased average).
- ``"unsigned"``: the real hook's result without its sign (a codec that drops the sign bit).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import commcomp.hooks

MUTANTS = ("identity", "scaled", "unsigned")


def _identity_hook(state, bucket):
    if bucket.is_last():
        state.step += 1
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _transformed(real, transform):
    def hook(state, bucket):  # DDP requires the parameter names (state, bucket)
        return real(state, bucket).then(lambda fut: transform(fut.value()))

    return hook


def wrong_hook(real, mutant: str):
    """The hook function of ``mutant`` around the real hook ``real``."""
    if mutant == "identity":
        return _identity_hook
    if mutant == "scaled":
        return _transformed(real, lambda t: t * 1.1)
    if mutant == "unsigned":
        return _transformed(real, torch.abs)
    raise ValueError(f"unknown mutant {mutant!r}; one of {MUTANTS}")


@contextlib.contextmanager
def installed(name: str, mutant: str):
    """``commcomp.register(model, name, ...)`` installs the wrong hook inside this block (in
    this process: call it in the worker)."""
    state_cls, real = commcomp.hooks.HOOKS[name]
    commcomp.hooks.HOOKS[name] = (state_cls, wrong_hook(real, mutant))
    try:
        yield
    finally:
        commcomp.hooks.HOOKS[name] = (state_cls, real)


def expect_caught(mutant: str, check, *args, **kwargs) -> None:
    """``check(*args, **kwargs)`` must raise AssertionError on what the ``mutant`` hook produced."""
    try:
        with pytest.raises(AssertionError):
            check(*args, **kwargs)
    except pytest.fail.Exception:
        pytest.fail(f"{check.__name__} passed the {mutant!r} hook: it cannot tell a wrong hook "
                    "from a right one")

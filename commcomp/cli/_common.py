"""What the sub-command modules share: one way to register a topic."""

from __future__ import annotations

import argparse
from typing import Callable, Optional


def add_topic(sub, name: str, func: Optional[Callable], *, help: str, description: str,
              epilog: Optional[str] = None, raw: bool = False) -> argparse.ArgumentParser:
    """Add ``commcomp NAME`` to ``sub`` (an ``add_subparsers()`` result); it runs ``func(args)``
    (None: a topic whose actions set their own). ``raw`` keeps the line breaks of the
    description and epilog (examples, tables) instead of re-wrapping them."""
    kw = {"formatter_class": argparse.RawDescriptionHelpFormatter} if raw else {}
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, **kw)
    if func is not None:
        p.set_defaults(func=func)
    return p

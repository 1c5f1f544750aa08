"""The one exception type whose message is shown to users as a one-line error, and the range check behind most."""

from __future__ import annotations

import math

SEED_MAX = 2**63 - 1  # seeds are stored as int64 attributes
MAX_VIEWS = 255  # the store's view column is uint8, view 0 being the plain one


class PipelineError(Exception):
    """A problem with the user's input or files; the message names it and says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command; the message says what was kept (the CLI prints it, exit code 130)."""


def check_range(option: str, value, low=None, high=None) -> None:
    """Refuse a number outside [low, high] (either end open when None), or not finite, naming the option and range."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if bad or (low is not None and value < low) or (high is not None and value > high):
        span = (
            f"from {low} to {high}"
            if low is not None and high is not None
            else f"{low} or more"
            if low is not None
            else f"at most {high}"
        )
        raise PipelineError(f"{option} {value} is out of range; give a number {span}")


def check_memory(option: str, needed: int, available: int, what: str) -> None:
    """Refuse settings whose estimated memory exceeds what the machine has free, before any work starts."""
    if needed > available:
        raise PipelineError(
            f"{option} needs about {needed / 2**30:.1f} GB for {what}, more than the "
            f"{available / 2**30:.1f} GB available; lower it"
        )

"""Checks and parsers of command-line options that every command shares, with one wording of
their errors (UserError: one line, exit code 2). Standard library only."""
from __future__ import annotations

from fewstep.errors import UserError


def check_range(flag: str, value, low, high=None) -> None:
    """Refuse a numeric option outside [low, high] (high None: no upper bound) with the one-line
    message every command uses: "--num must be >= 2, got 1", "--gamma must be in [0, 1], got 2".
    None (an option left out) passes; NaN does not."""
    if value is None:
        return
    if high is None:
        if not value >= low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    elif not low <= value <= high:
        raise UserError(f"{flag} must be in [{low}, {high}], got {value}")


def parse_int_list(text: str, flag: str, low: int | None = None) -> list[int]:
    """'4,1,2,1' -> [4, 1, 2]: in the order given, each value once (callers sort as they
    need); at least one value, each >= low when low is given."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag}: expected at least one value")
    bad = [v for v in values if low is not None and v < low]
    if bad:
        raise UserError(f"{flag}: values must be >= {low}, got {bad[0]}")
    return list(dict.fromkeys(values))


def require(args, rules: dict) -> None:
    """rules {attribute: (test, rule)}: a UserError "--flag must be RULE, got VALUE" for the first
    value given (not None) that fails its test."""
    for attr, (ok, rule) in rules.items():
        value = getattr(args, attr)
        if value is not None and not ok(value):
            raise UserError(f"--{attr.replace('_', '-')} must be {rule}, got {value}")

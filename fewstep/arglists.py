"""Numbers on the command line: lists of them, and their limits (torch-free: every layer's CLI
uses them)."""
from __future__ import annotations

from fewstep.errors import UserError


def parse_int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """'4,1,2,1' -> [4, 1, 2]: the order given, each value once, each >= minimum; a
    UserError naming `flag` otherwise."""
    out: list[int] = []
    for tok in str(text).replace(" ", "").split(","):
        if tok == "":
            continue
        try:
            v = int(tok)
        except ValueError:
            raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
        if v < minimum:
            raise UserError(f"{flag}: values must be >= {minimum}, got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise UserError(f"{flag}: expected at least one value")
    return out


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """Step counts, as `fewstep eval` and `fewstep bench` take them."""
    return parse_int_list(text, flag)


def require(args, rules: dict) -> None:
    """rules {attribute: (test, rule)}: a UserError "--flag must be RULE, got VALUE" for the first
    value given (not None) that fails its test."""
    for attr, (ok, rule) in rules.items():
        value = getattr(args, attr)
        if value is not None and not ok(value):
            raise UserError(f"--{attr.replace('_', '-')} must be {rule}, got {value}")

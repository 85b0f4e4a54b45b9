"""Lists of numbers on the command line (torch-free: every layer's CLI parses them here)."""
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

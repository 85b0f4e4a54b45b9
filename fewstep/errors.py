class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


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

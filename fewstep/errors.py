class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""

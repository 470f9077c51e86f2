"""One exception type for problems the user can fix; the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input: a missing path, a malformed file, an unknown name, an empty data set."""

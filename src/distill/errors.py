"""One exception type for every input problem a user can fix; the CLI prints it as one line."""


class DistillError(Exception):
    """A problem with the user's input or files, stated as what is wrong and how to fix it."""

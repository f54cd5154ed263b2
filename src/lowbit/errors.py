"""User-facing errors: one line that names the cause and the fix; the CLI exits 2 on them."""


class LowbitError(Exception):
    """An error caused by the user's input. The message names the cause and the fix."""

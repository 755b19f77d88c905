"""The one error of the conversion (its own module: every other one raises it)."""


class ConversionError(ValueError):
    """An authors' checkpoint that cannot become the configured model (not one, a key or
    class layout that does not fit); the message is one line naming the file and keys."""

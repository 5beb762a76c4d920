"""The one exception type shear raises for bad input or a missing resource."""


class ShearError(Exception):
    """A user-facing error: bad input, an unsupported model, a missing resource.

    The CLI prints its message and exits with status 2, without a traceback.
    """

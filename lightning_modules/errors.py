"""The one exception type that ``train.py`` turns into a single line on stderr."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong option, data of the wrong shape.

    ``train.py`` prints ``error: <message>`` and exits with status 2 instead of a traceback,
    so every message must say what is wrong and what to do about it.
    """

"""The one exception type the CLI turns into a one-line message."""


class SmiError(Exception):
    """A problem with the user's input or files, explained in one line.

    The CLI prints ``smi: error: <message>`` and exits with status 2; library users catch it
    like any other exception.
    """

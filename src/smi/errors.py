"""The one exception type the CLI turns into a one-line message."""

from __future__ import annotations

__all__ = ["SmiError", "SmiWarning"]


class SmiWarning(UserWarning):
    """A setting that works but is almost surely wrong; the CLI prints it as one ``smi: warning:`` line."""


class SmiError(ValueError):
    """A problem with the user's input or files, explained in one line.

    ``param`` names the library parameter at fault (a config field such as ``batch_size``);
    the message starts with it, and the CLI replaces it with the flag the user typed
    (``--batch-size``). The CLI prints ``smi: error: <message>`` and exits with status 2;
    library users catch it like any other ``ValueError``.

    >>> str(SmiError("must be >= 1, got 0", param="epochs"))
    'epochs must be >= 1, got 0'
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        self.detail = message
        super().__init__(f"{param} {message}" if param and not message.startswith(param) else message)

    def with_name(self, name: str) -> SmiError:
        """The same error with ``param`` shown as ``name`` (a CLI flag); its type is kept."""
        detail = self.detail[len(self.param):].lstrip() if self.param and self.detail.startswith(self.param) \
            else self.detail
        new = type(self)(f"{name} {detail}")
        new.param = name  # already named: a second mapping leaves it alone
        return new

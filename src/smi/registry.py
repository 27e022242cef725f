"""One registry per extension point, after timm's ``@register_model`` / ``list_models``.

A loss term, label sampler, curriculum, synthesis method, quantizer preset, data source or
evaluation dataset is one class or function with a decorator::

    TERMS = Registry("loss term")

    @TERMS.register("psaq")
    class PatchSimilarityEntropy(Term):
        '''Minus the KDE entropy of patch-to-patch similarities.'''

The CLI's choices and ``--help`` lines and the tests' parametrization read the registries
(:meth:`Registry.names`, :meth:`Registry.help`), so adding a piece never means editing a list
elsewhere.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from smi.errors import SmiError

__all__ = ["Registry", "did_you_mean"]

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


class Registry(Generic[T]):
    """Named entries of one kind, in registration order."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "loss term", used in error messages
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._options: dict[str, dict[str, float]] = {}

    def register(self, name: str, help: str | None = None, options: dict[str, float] | None = None
                 ) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``.

        ``help`` defaults to the docstring's first paragraph; ``options`` (the knobs the entry reads,
        name -> default) to the object's ``options`` attribute, if any.
        """

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = obj
            doc = help if help is not None else (inspect.getdoc(obj) or "").strip()
            self._help[name] = " ".join(doc.split("\n\n")[0].split())
            self._options[name] = dict(options if options is not None else getattr(obj, "options", {}))
            return obj

        return add

    def get(self, name: str, param: str | None = None) -> T:
        """The entry called ``name``, or an :class:`SmiError` listing the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise SmiError(f"unknown {self.what} {name!r}{did_you_mean(name, self.names())}; "
                           f"choose from {', '.join(self.names())}", param=param) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def help(self, name: str) -> str:
        return self._help[name]

    def options(self, name: str) -> dict[str, float]:
        """The knobs entry ``name`` reads, with their defaults."""
        return dict(self._options[name])

    def all_options(self) -> dict[str, float]:
        """Every entry's knobs (names are unique across a registry's entries)."""
        return {k: v for opts in self._options.values() for k, v in opts.items()}

    def help_lines(self, width: int = 14, indent: str = "  ", columns: int | None = None) -> str:
        """``name  help`` per entry for a ``--help`` description, wrapped to the terminal (or ``columns``)."""
        import shutil
        import textwrap

        columns = columns or min(120, shutil.get_terminal_size().columns)
        hang = " " * (len(indent) + width + 1)
        return "\n".join(textwrap.fill(f"{indent}{n:<{width}} {self._help[n]}", width=max(columns, len(hang) + 30),
                                        subsequent_indent=hang) for n in self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"

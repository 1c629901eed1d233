"""Errors whose messages name arguments through a naming function (standard library only).

``str(error)`` names the arguments as the Python API does (``batch_size must be >= 1``);
``error.named(naming)`` as a caller says them: the CLI passes a function from API names to its flags
(``--batch-size must be >= 1``). The message is written where the error is raised, by a function of the
naming, so no caller has to guess from the text which words are argument names.

>>> error = ArgumentError(lambda n: f"{n('batch_size')} must be >= 1; got 0")
>>> str(error), error.named(lambda name: "--" + name.replace("_", "-"))
('batch_size must be >= 1; got 0', '--batch-size must be >= 1; got 0')
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "Naming",
    "NamedMessage",
    "ArgumentError",
    "ArgumentTypeError",
    "NamedText",
    "message_of",
    "message_template",
    "from_template",
]

Naming = Callable[[str], str]


def _as_written(name: str) -> str:
    return name


class NamedMessage:
    """A mixin for exceptions about named arguments: the message is written by ``render(naming)``, a
    function of how the arguments are named (``ArgumentError(lambda n: f"{n('steps')} must be >= 1")``)."""

    def __init__(self, render: Callable[[Naming], str] | str):
        if isinstance(render, str):  # rebuilt from its message (pickling, copy)
            message = render
            render = lambda naming: message  # noqa: E731
        self.render = render
        super().__init__(render(_as_written))

    def named(self, naming: Naming) -> str:
        """The message with each argument named by ``naming`` (e.g. a field name -> its CLI flag)."""
        return self.render(naming)


class ArgumentError(NamedMessage, ValueError):
    """A ValueError about named arguments; ``named(naming)`` writes it with other names for them."""


class ArgumentTypeError(NamedMessage, TypeError):
    """A TypeError about named arguments; ``named(naming)`` writes it with other names for them."""


class NamedText(str):
    """A message (e.g. for a ``log`` callback) that names arguments: a ``str`` naming them as the API
    does, whose ``named(naming)`` writes it with other names for them."""

    def __new__(cls, render: Callable[[Naming], str]) -> NamedText:
        text = super().__new__(cls, render(_as_written))
        text.render = render
        return text

    def named(self, naming: Naming) -> str:
        """The message with each argument named by ``naming``."""
        return self.render(naming)


_MARK = "\0"


def message_template(error: BaseException) -> str:
    """``error``'s message with its named arguments marked, to rebuild it elsewhere
    (``from_template``; e.g. in another process of a run)."""
    return message_of(error, lambda name: f"{_MARK}{name}{_MARK}")


def from_template(template: str) -> Callable[[Naming], str]:
    """The message writer of a ``message_template``: ``from_template(t)(naming)`` is the message."""
    parts = template.split(_MARK)
    return lambda naming: "".join(naming(part) if k % 2 else part for k, part in enumerate(parts))


def message_of(error: BaseException | str, naming: Naming) -> str:
    """The message of ``error`` (an exception or a ``NamedText``) with its arguments named by
    ``naming`` where it says which they are."""
    return error.named(naming) if isinstance(error, NamedMessage | NamedText) else str(error)

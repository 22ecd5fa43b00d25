"""The exception family for errors a user can fix.

Every error that comes from user input (a recipe, a checkpoint, a config tree, a
command-line value) is a :class:`RockqError`. The command-line tool catches this one
family in one place, prints ``str(error)`` as a single line and exits with code 2.
Anything else is an internal error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RockqError(Exception):
    """Base class of user-facing errors.

    Args:
        message: What was expected, what was found and how to fix it, in one line.
        path: The file the error is about, if any.
        key: The key path inside that file or tree (``params[2].args.num_levels``).
        line: The 1-based line number in ``path``, if known.

    Example:
        >>> str(RockqError("must be >= 2, got 1", path="r.yaml", key="params[0].args", line=4))
        'r.yaml:4: params[0].args: must be >= 2, got 1'
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.key = key
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
            where += ": "
        if self.key:
            where += f"{self.key}: "
        return where + self.message


class RecipeError(RockqError):
    """A recipe that does not parse or does not validate."""


class CheckpointError(RockqError):
    """A network or checkpoint that cannot be loaded, or an output that cannot be written."""


class ConfigError(RockqError, ValueError):
    """A transformation config tree that does not fit the network it is applied to."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``' (did you mean 'x'?)'`` for the closest candidate, or ``''``.

    Example:
        >>> did_you_mean("stochastic_roundin", ["stochastic_rounding", "dropout"])
        " (did you mean 'stochastic_rounding'?)"
    """
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""

"""User-facing errors.

Every problem a user can fix (bad input, absurd parameter, missing model weights) is raised
as a :class:`Mono4dError` with a message that says what was wrong and a ``hint`` that says
what to do. The CLI prints both and exits with :attr:`Mono4dError.exit_code`; it never shows
a traceback for these.
"""
from __future__ import annotations


class Mono4dError(Exception):
    """Base class of errors the user can act on."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(Mono4dError):
    """The input data (video, images, dataset, user-provided files) is missing or unusable."""


class ParameterError(Mono4dError):
    """A stage parameter or CLI option has an invalid value."""


class ModelUnavailableError(Mono4dError):
    """A learned model's weights or code cannot be loaded here."""


class StageFailure(Mono4dError):
    """A stage ran but could not produce a usable result (e.g. COLMAP registered nothing)."""

    exit_code = 3


def require_inputs(inputs, names, stage: str) -> None:
    """Raise :class:`InputError` naming the first of the upstream stages ``names`` whose output
    is missing from the stage function's ``inputs`` mapping (stage name -> output folder)."""
    for name in names:
        if name not in inputs:
            raise InputError(f"the {stage} stage needs the {name} stage's output (inputs[{name!r}])",
                             f"run the {name} stage first (the pipeline schedules it: mono4d run)")

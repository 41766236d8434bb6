"""The one exception type that the command line turns into a one-line error."""

from __future__ import annotations


class QwenrtError(Exception):
    """A problem the user can fix: the message names it and the way out."""

    exit_code = 2


class SourceError(QwenrtError):
    """The conversion source is missing, unreadable or not a Qwen2 model."""


class ModelNotFoundError(QwenrtError):
    """No converted model where a command looked for one."""


class ArtifactError(QwenrtError):
    """A converted artifact is damaged or incomplete."""


class WriteError(QwenrtError):
    """Writing failed: no space left, no permission, or a file where a folder should be."""

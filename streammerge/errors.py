"""One hierarchy of errors for streammerge.

Every error the library raises on bad input or a failed operation is a
``StreamMergeError``.  Subclasses also derive from the matching builtin
(``ValueError`` / ``OSError``) so callers that already catch those keep working.
Messages are full sentences that name the file, tensor and value involved and,
where there is one, the fix.  The CLI maps each class to an exit code.
"""

from __future__ import annotations

__all__ = [
    "StreamMergeError",
    "DistributedError",
    "InputError",
    "SafetensorsFormatError",
    "AdapterError",
    "UnsupportedAdapterError",
    "PlanError",
    "HubError",
    "MethodParameterError",
    "OutputError",
    "ResumeError",
    "DiskSpaceError",
    "OutputLockedError",
    "exit_code_for",
]


class StreamMergeError(Exception):
    """Base class of every error streammerge raises on purpose."""

    exit_code = 1


class InputError(StreamMergeError, ValueError):
    """An input (model, adapter, recipe, option) is missing or malformed."""

    exit_code = 2


class SafetensorsFormatError(InputError):
    """A safetensors file or index is malformed (header, dtype, offsets, shards)."""


class AdapterError(InputError):
    """A PEFT adapter is malformed or does not fit the base model."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT adapter uses a feature streammerge cannot merge correctly (yet)."""


class PlanError(InputError):
    """Validation found problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the merge cannot start; {len(self.problems)} problem(s) found:\n{lines}")


class HubError(InputError):
    """A Hugging Face Hub repo id cannot be resolved (not cached while offline, gated, missing, bad revision)."""


class MethodParameterError(InputError):
    """An unknown merge method, or a bad method parameter name or value."""


class OutputError(StreamMergeError, OSError):
    """The output directory cannot be written safely."""

    exit_code = 3


class ResumeError(OutputError):
    """An interrupted job cannot be resumed with the given recipe or inputs."""


class DiskSpaceError(OutputError):
    """Not enough free disk space for the planned output."""


class OutputLockedError(OutputError):
    """Another process is writing a job into the same output directory."""


class DistributedError(StreamMergeError):
    """A rank of a distributed job failed or stopped answering, or the ranks disagree about the job."""


def exit_code_for(error: BaseException) -> int:
    """The process exit code the CLI uses for ``error``."""
    if isinstance(error, StreamMergeError):
        return error.exit_code
    return 1

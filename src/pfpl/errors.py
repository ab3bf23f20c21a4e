"""Every error a user can cause, as one class tree with no heavy imports.

Each is raised with a single line that names the bad value and what is allowed; the CLI's one
error handler (:mod:`pfpl.cli`) prints it and exits with status 2. Keeping this module free of
torch lets the CLI report a bad config without importing the numerical stack.
"""

from __future__ import annotations


class PfplError(ValueError):
    """A bad input or request, explained in one line."""


class ConfigError(PfplError):
    """An invalid configuration: one line naming the key, the value and what is allowed."""


class BackboneError(PfplError):
    """A backbone cannot be built as asked (unknown name, missing weights, download needed)."""


class DatasetError(PfplError):
    """A dataset cannot be built as asked (bad folder, unknown split, bad recipe)."""


class PartitionError(PfplError):
    """A partition cannot be built as asked; the message names the bad value and what is allowed."""


class CheckpointError(PfplError):
    """A checkpoint or run folder that cannot be resumed from."""


class PrivacyConfigError(PfplError):
    """An invalid privacy setting, or a combination pfpl cannot account for."""


class AuditError(PfplError):
    """A bad audit request (missing run folder, unknown method, too few shadows, …)."""


class BenchError(PfplError):
    """A benchmark that cannot be set up as asked."""


class ProtocolError(PfplError):
    """A message between clients and server that breaks the protocol (wrong shape, key, round)."""


class DeploymentError(PfplError):
    """A federation that cannot start or go on (a SuperLink or SuperNodes missing, too few answers)."""


class ArtifactError(PfplError):
    """A prompt artifact that cannot be written, read or used (missing, tampered, wrong backbone)."""

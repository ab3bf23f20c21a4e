"""A released prompt as one file: what someone else needs to use it, and what it cost in privacy.

The file is safetensors: one tensor, ``context`` (``[M, D]``, or ``[C, M, D]`` for class-specific
contexts), and string metadata — the class names and template, the backbone's name and weight
fingerprint, the method and client, and a privacy certificate. Reading it parses JSON and tensor
bytes only; nothing in the file is executed. A SHA-256 digest over the tensor and every metadata
field catches a file changed after export (an integrity check, not a signature: whoever edits the
file can recompute it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pfpl.errors import ArtifactError

FORMAT = "pfpl-prompt/1"
_FIELDS = (
    "format",
    "method",
    "client",
    "classnames",
    "template",
    "backbone",
    "backbone_pretrained",
    "backbone_fingerprint",
    "certificate",
    "provenance",
)


@dataclass
class PromptArtifact:
    """One client's released prompt and the facts a receiver needs about it."""

    context: torch.Tensor  # [M, D] shared by all classes, or [C, M, D]
    classnames: list[str]
    template: str
    backbone: str
    backbone_fingerprint: str
    method: str
    client: int
    certificate: dict[str, Any]
    backbone_pretrained: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # run folder, reported accuracies

    @property
    def n_ctx(self) -> int:
        return int(self.context.shape[-2])

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "method": self.method,
            "client": str(self.client),
            "classnames": json.dumps(self.classnames),
            "template": self.template,
            "backbone": self.backbone,
            "backbone_pretrained": json.dumps(self.backbone_pretrained),
            "backbone_fingerprint": self.backbone_fingerprint,
            "certificate": json.dumps(self.certificate, sort_keys=True),
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }

    def save(self, path: Path | str) -> None:
        from safetensors.torch import save

        from pfpl.artifacts import atomic_write_bytes

        check_context(self.context, len(self.classnames), Path(path))
        context = self.context.detach().to("cpu", torch.float32).contiguous()
        meta = self.metadata()
        meta["digest"] = _digest(context, meta)
        atomic_write_bytes(Path(path), save({"context": context}, metadata=meta))

    @classmethod
    def load(cls, path: Path | str) -> PromptArtifact:
        """Read and check an artifact; every problem is one :class:`ArtifactError` line."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"prompt artifact {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        except (SafetensorError, ValueError, OSError) as exc:
            raise ArtifactError(f"{path} is not a safetensors file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ArtifactError(
                f"{path} is not a pfpl prompt artifact (format {meta.get('format')!r}, expected {FORMAT})"
            )
        missing = [k for k in (*_FIELDS, "digest") if k not in meta]
        if missing or set(tensors) != {"context"}:
            what = ", ".join(missing) if missing else f"tensors {sorted(tensors)} (expected only 'context')"
            raise ArtifactError(f"{path} is an incomplete pfpl prompt artifact: missing {what}")
        context = tensors["context"]
        digest = meta.pop("digest")
        if _digest(context, meta) != digest:
            raise ArtifactError(f"{path} was modified after export: its digest does not match its contents")
        try:
            classnames = json.loads(meta["classnames"])
            artifact = cls(
                context=context,
                classnames=classnames,
                template=meta["template"],
                backbone=meta["backbone"],
                backbone_fingerprint=meta["backbone_fingerprint"],
                method=meta["method"],
                client=int(meta["client"]),
                certificate=json.loads(meta["certificate"]),
                backbone_pretrained=json.loads(meta["backbone_pretrained"]),
                provenance=json.loads(meta["provenance"]),
            )
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{path} has malformed metadata ({exc})") from None
        if not (isinstance(classnames, list) and classnames and all(isinstance(c, str) for c in classnames)):
            raise ArtifactError(f"{path}: classnames must be a non-empty list of strings")
        check_context(context, len(classnames), path)
        return artifact


def check_context(context: torch.Tensor, n_classes: int, path: Path) -> None:
    shape = tuple(context.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == n_classes)) or 0 in shape:
        raise ArtifactError(
            f"{path}: context of shape {shape} does not fit {n_classes} classes "
            "(expected [n_ctx, dim] or [classes, n_ctx, dim])"
        )
    if not torch.isfinite(context).all():
        raise ArtifactError(f"{path}: the context holds NaN or infinite values")


def _digest(context: torch.Tensor, meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"{tuple(context.shape)}:{context.dtype}".encode())
    h.update(context.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: meta[k] for k in sorted(meta)}).encode())
    return h.hexdigest()

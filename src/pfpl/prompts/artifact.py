"""A released prompt as one file: what someone else needs to use it, and what it cost in privacy.

The file is safetensors: the ``context`` tensor (``[M, D]``, or ``[C, M, D]`` for class-specific
contexts) and string metadata — the class names and template, the backbone's name and weight
fingerprint, the method and client, and a privacy certificate. Reading it parses JSON and tensor
bytes only; nothing in the file is executed. A SHA-256 digest over the tensors and every metadata
field catches a file changed after export (an integrity check, not a signature: whoever edits the
file can recompute it).

A prompt with vision prompts (VPT, IVLP, MaPLe, DP-FPL on the image tower) is format 2: a ``vision``
tensor ``[depth, P, W]`` and the fields that rebuild the prompted image tower (``vision_tokens``,
``vision_depth``, ``vision_start``), and ``text`` saying what classifies: ``"context"`` (the
``context`` tensor through the text tower, as in format 1) or ``"template"`` (a frozen-text method:
the template's class text features, computed from the class names, template and backbone, so no
context tensor is stored). A prompt without vision prompts is still written as format 1, so older
readers keep reading it; format 2 is new so they refuse vision prompts by name instead of misreading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pfpl.errors import ArtifactError

FORMAT = "pfpl-prompt/1"  # text context only
FORMAT_VISION = "pfpl-prompt/2"  # format 1 plus vision prompts (and an optional context)
TEXT_KINDS = ("context", "template")  # what classifies: the context through the text tower, or the template
_VISION_FIELDS = ("text", "vision_tokens", "vision_depth", "vision_start")
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

    context: torch.Tensor | None  # [M, D] shared by all classes, or [C, M, D]; None: the frozen template classifies
    classnames: list[str]
    template: str
    backbone: str
    backbone_fingerprint: str
    method: str
    client: int
    certificate: dict[str, Any]
    backbone_pretrained: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # run folder, reported accuracies
    vision: torch.Tensor | None = None  # [depth, P, W] vision prompts in image layers vision_start …
    vision_start: int = 0  # the first prompted image layer (PromptedVision's ``start``)

    @property
    def n_ctx(self) -> int:
        return 0 if self.context is None else int(self.context.shape[-2])

    @property
    def text(self) -> str:
        """What classifies on the text side: ``"context"`` or ``"template"`` (frozen text)."""
        return "template" if self.context is None else "context"

    @property
    def format(self) -> str:
        return FORMAT if self.vision is None else FORMAT_VISION

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the file holds, as written (float32, contiguous, on the CPU)."""
        pairs = {"context": self.context, "vision": self.vision}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in pairs.items() if v is not None}

    def metadata(self) -> dict[str, str]:
        vision = {}
        if self.vision is not None:
            vision = {
                "text": self.text,
                "vision_tokens": str(int(self.vision.shape[-2])),
                "vision_depth": str(int(self.vision.shape[0])),
                "vision_start": str(self.vision_start),
            }
        return {
            **vision,
            "format": self.format,
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

        path = Path(path)
        if self.context is None and self.vision is None:
            raise ArtifactError(f"{path}: a prompt artifact needs a context, vision prompts, or both")
        if self.context is not None:
            check_context(self.context, len(self.classnames), path)
        if self.vision is not None:
            check_vision(self.vision, self.vision_start, path)
        tensors = self.tensors()
        meta = self.metadata()
        meta["digest"] = _digest(tensors, meta)
        atomic_write_bytes(path, save(tensors, metadata=meta))

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
        fmt = meta.get("format")
        if fmt not in (FORMAT, FORMAT_VISION):
            raise ArtifactError(
                f"{path} is not a pfpl prompt artifact (format {fmt!r}, expected {FORMAT} or {FORMAT_VISION})"
            )
        has_vision = fmt == FORMAT_VISION
        missing = [k for k in (*_FIELDS, *(_VISION_FIELDS if has_vision else ()), "digest") if k not in meta]
        if missing:
            raise ArtifactError(f"{path} is an incomplete pfpl prompt artifact: missing {', '.join(missing)}")
        if has_vision and meta["text"] not in TEXT_KINDS:
            raise ArtifactError(f"{path}: text {meta['text']!r} is not one of {', '.join(TEXT_KINDS)}")
        expected = {"context"}
        if has_vision:
            expected = {"vision", "context"} if meta["text"] == "context" else {"vision"}
        if set(tensors) != expected:
            raise ArtifactError(
                f"{path} is an incomplete pfpl prompt artifact: tensors {sorted(tensors)} (expected {sorted(expected)})"
            )
        digest = meta.pop("digest")
        if _digest(tensors, meta) != digest:
            raise ArtifactError(f"{path} was modified after export: its digest does not match its contents")
        try:
            classnames = json.loads(meta["classnames"])
            vision_fields = {k: int(meta[k]) for k in _VISION_FIELDS[1:]} if has_vision else {}
            artifact = cls(
                context=tensors.get("context"),
                vision=tensors.get("vision"),
                vision_start=vision_fields.get("vision_start", 0),
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
        if artifact.context is not None:
            check_context(artifact.context, len(classnames), path)
        if artifact.vision is not None:
            check_vision(artifact.vision, artifact.vision_start, path)
            shape = tuple(artifact.vision.shape[:2])
            if shape != (vision_fields["vision_depth"], vision_fields["vision_tokens"]):
                raise ArtifactError(
                    f"{path}: the vision prompts' shape {tuple(artifact.vision.shape)} does not match vision_depth "
                    f"{vision_fields['vision_depth']} and vision_tokens {vision_fields['vision_tokens']}"
                )
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


def check_vision(vision: torch.Tensor, start: int, path: Path) -> None:
    """Vision prompts are ``[depth, P, W]`` finite values, from a layer ``start`` ≥ 0 (whether they fit the
    backbone's image tower is checked against it, in :func:`pfpl.evaluation.predict.classify`)."""
    shape = tuple(vision.shape)
    if len(shape) != 3 or 0 in shape:
        raise ArtifactError(f"{path}: vision prompts of shape {shape} (expected [depth, tokens, width])")
    if not torch.isfinite(vision).all():
        raise ArtifactError(f"{path}: the vision prompts hold NaN or infinite values")
    if start < 0:
        raise ArtifactError(f"{path}: vision_start {start} must be at least 0")


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of every tensor (shape, dtype, bytes) and every metadata field; for a format-1 file (the
    context alone) the same bytes format 1 always hashed."""
    h = hashlib.sha256()
    for name in ("context", "vision"):
        if name in tensors:
            t = tensors[name].contiguous()
            h.update(f"{'' if name == 'context' else name + ':'}{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({k: meta[k] for k in sorted(meta)}).encode())
    return h.hexdigest()

"""Frozen open_clip backbone: image features, prompt token embeddings, and a differentiable text
tower over prompt embeddings that runs on only ``max_eot + 1`` positions (DESIGN §3)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pfpl.errors import BackboneError


@dataclass
class _Parts:
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _parts_of(model: nn.Module) -> _Parts:
    holder = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
    if not hasattr(holder, "token_embedding"):
        raise BackboneError(f"{type(model).__name__} has no open_clip text transformer to prompt")
    return _Parts(
        token_embedding=holder.token_embedding,
        positional_embedding=holder.positional_embedding,
        transformer=holder.transformer,
        ln_final=holder.ln_final,
        text_projection=holder.text_projection,
        attn_mask=getattr(holder, "attn_mask", None),
        pool_type=getattr(holder, "text_pool_type", getattr(holder, "pool_type", "argmax")),
        eos_id=getattr(holder, "text_eos_id", getattr(holder, "eos_id", None)),
    )


class TextTower(nn.Module):
    """An open_clip text tower from token embeddings to projected features, as a module of its own.

    It shares its weights with the model it was taken from (frozen in a backbone). Because it is a
    module, one party can run it on other weights without touching the shared model:
    ``torch.func.functional_call(tower, params, (x, eot))`` with ``params`` from
    :meth:`trainable_copy` (FedSP's clients train their auxiliary text body this way).
    """

    def __init__(self, parts: _Parts):
        super().__init__()
        self.token_embedding = parts.token_embedding
        self.positional_embedding = parts.positional_embedding
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.text_projection = parts.text_projection
        self.attn_mask = parts.attn_mask
        self.pool_type = parts.pool_type
        self.eos_id = parts.eos_id

    @classmethod
    def of(cls, model: nn.Module) -> TextTower:
        return cls(_parts_of(model))

    @property
    def causal(self) -> bool:
        """Whether tokens after the EOT can be dropped: causal mask and pooling at the EOT."""
        if self.attn_mask is None or self.pool_type not in ("argmax", "eos"):
            return False
        upper = torch.triu(torch.ones_like(self.attn_mask, dtype=torch.bool), diagonal=1)
        return bool(torch.isinf(self.attn_mask[upper]).all()) and not bool(self.attn_mask[~upper].any())

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "eos" and self.eos_id is not None:
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def trainable_copy(self, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
        """Detached, trainable copies of the weights whose names start with ``prefix`` (default:
        the transformer body), for :func:`torch.func.functional_call`; the shared model is untouched."""
        return {
            name: p.detach().clone().requires_grad_(True)
            for name, p in self.named_parameters()
            if name.startswith(prefix)
        }

    def forward(self, x: torch.Tensor, eot: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Projected, unnormalised text features from token embeddings ``x`` [N, L, D].

        With ``truncate`` (and a causal tower) the sequence is cut to ``max(eot) + 1`` positions,
        which cannot change the features at the EOT tokens.
        """
        if truncate and self.causal:
            x = x[:, : int(eot.max()) + 1]
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        if self.pool_type in ("argmax", "eos"):
            x = x[torch.arange(x.shape[0], device=x.device), eot]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "last":
            x = x[:, -1]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def weights_fingerprint(model: nn.Module, name: str) -> str:
    """Hash of the model name and every weight: a changed backbone never reuses stale features."""
    h = hashlib.sha256(name.encode())
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class OpenClipBackbone:
    """A frozen open_clip model behind pfpl's backbone contract (DESIGN §3)."""

    def __init__(self, model: nn.Module, name: str, preprocess: Any, tokenizer: Any, device: str = "cpu"):
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.text = TextTower.of(self.model)
        self.fingerprint = weights_fingerprint(self.model, name)
        self.preprocess_id = repr(preprocess)

    @property
    def ctx_dim(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features for a preprocessed batch ``[N, 3, H, W]``."""
        return F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(tokens.to(self.device)).float()

    def text_features_from_embeddings(
        self, x: torch.Tensor, eot: torch.Tensor, truncate: bool = True, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Differentiable: normalised text features from prompt embeddings ``[N, L, D]``; ``params``
        replaces some of the tower's weights for this call only (see :class:`TextTower`)."""
        if params:
            out = torch.func.functional_call(self.text, params, (x, eot.to(x.device), truncate))
        else:
            out = self.text(x, eot.to(x.device), truncate)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str], truncate: bool = True) -> torch.Tensor:
        tokens = self.tokenize(texts)
        return self.text_features_from_embeddings(
            self.text.token_embedding(tokens), self.text.eot_positions(tokens), truncate
        )


def _local_weights_for_tag(model_name: str, tag: str, cache_dir: str | None) -> str:
    """Path of an already-downloaded checkpoint for a pretrained tag. Only the local caches are read
    (the hub's cache through ``try_to_load_from_cache``, open_clip's URL cache by file name): no
    request is ever made, so a missing file is one error at once."""
    from open_clip import pretrained as pt

    hint = (
        f"backbone.pretrained={tag!r} for {model_name} needs a download, and pfpl never downloads at run time; "
        f"pass a local checkpoint instead: --set backbone.pretrained=/path/to/{model_name}.bin"
    )
    cfg = pt.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = ", ".join(pt.list_pretrained_tags_by_model(model_name)) or "none"
        raise BackboneError(
            f"backbone.pretrained={tag!r} is neither a local file nor a known tag for {model_name} "
            f"(known tags: {known})"
        )
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" (default file name) or "org/model/file"
        filename = filename or pt.HF_WEIGHTS_NAME
        names = [filename] + ([pt.HF_SAFE_WEIGHTS_NAME] if filename == pt.HF_WEIGHTS_NAME else [])
        for name in reversed(names):  # safetensors first, as open_clip prefers it
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return found
    url = cfg.get("url", "")
    for folder in (cache_dir, Path.home() / ".cache" / "clip"):
        target = Path(folder) / os.path.basename(url) if folder and url else None
        if target is not None and target.is_file():
            return str(target)
    raise BackboneError(hint)


def _describe_checkpoint(path: str) -> str | None:
    """What is wrong with a checkpoint file before any loader reads it (``None``: plausible)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return None
    if size >= 8 and int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":  # safetensors header
        return None
    return f"it is not a PyTorch (.pt / .bin) or safetensors checkpoint ({size} bytes starting with {head[:8].hex()})"


_MISMATCH = ("state_dict", "size mismatch", "Missing key", "Unexpected key", "width changed", "shape")


def _load_failure(model_name: str, pretrained: str, exc: Exception) -> BackboneError:
    """One line that says what is wrong with a checkpoint that failed to load."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(word in str(exc) for word in _MISMATCH):
        return BackboneError(
            f"backbone.pretrained={pretrained!r} holds weights of another architecture than {model_name} "
            f"({type(exc).__name__}: {text[:160]})"
        )
    return BackboneError(
        f"backbone.pretrained={pretrained!r} is damaged or not an open_clip {model_name} checkpoint "
        f"({type(exc).__name__}: {text[:160]})"
    )


def load_open_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str = "cpu",
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> OpenClipBackbone:
    """Any open_clip model; weights from a local checkpoint path, a cached tag, or random init
    (``image_size`` rebuilds the image tower for that input size)."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise BackboneError(
            f"backbone.name={model_name!r} is not an open_clip model; "
            f"use 'embedded' or one of open_clip.list_models() (e.g. ViT-B-16, RN50)"
        )
    weights: str | None = None
    if pretrained:
        if Path(pretrained).expanduser().exists():
            weights = str(Path(pretrained).expanduser())
            if not Path(weights).is_file():
                raise BackboneError(f"backbone.pretrained={pretrained!r} is a folder, not a checkpoint file")
            problem = _describe_checkpoint(weights)
            if problem:
                raise BackboneError(f"backbone.pretrained={pretrained!r} cannot be loaded into {model_name}: {problem}")
        elif os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            raise BackboneError(f"backbone.pretrained={pretrained!r}: no such checkpoint file")
        else:
            weights = _local_weights_for_tag(model_name, pretrained, cache_dir)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, device="cpu", force_image_size=image_size
        )
    except Exception as exc:  # torch, pickle, zipfile and safetensors raise many types for a bad file
        raise _load_failure(model_name, str(pretrained), exc) from None
    label = f"{model_name}:{pretrained or 'random'}"
    return OpenClipBackbone(model, label, preprocess, open_clip.get_tokenizer(model_name), device)

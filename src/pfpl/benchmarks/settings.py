"""The benchmark's options, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass

from pfpl.errors import BenchError

METHOD = "dpfpl"  # the default workload's method (DP-FPL)
JSON_KEYS = (
    "speedup",
    "engine_s_per_round",
    "reference_s_per_round",
    "gflops",
    "peak_gflops",
    "text_tower_fraction_of_peak",
    "reference_clients_timed",
)


@dataclass
class BenchConfig:
    backbone: str = "ViT-B-16"  # any open_clip model name, or "embedded"
    clients: int = 10
    classes_per_client: int = 10
    batch_size: int = 32
    n_ctx: int = 16
    rank: int = 8
    steps: int = 1  # local steps per client per round
    repeats: int = 3
    reference_clients: int | None = None  # clients of the reference actually timed (None: all)
    image_size: int | None = None  # None: the model's own input size
    device: str = "cpu"
    peak_size: int | None = None  # side of the square fp32 matmul for the peak (None: 2048 CPU, 8192 CUDA)
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.clients * self.classes_per_client

    @property
    def timed_reference_clients(self) -> int:
        return self.reference_clients or self.clients


def validate(cfg: BenchConfig) -> None:
    for name in ("clients", "classes_per_client", "batch_size", "n_ctx", "rank", "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.reference_clients is not None and not 1 <= cfg.reference_clients <= cfg.clients:
        raise BenchError(
            f"--reference-clients must be between 1 and --clients ({cfg.clients}), got {cfg.reference_clients}"
        )
    if cfg.rank > cfg.n_ctx:
        raise BenchError(f"--rank {cfg.rank} must be at most --n-ctx {cfg.n_ctx}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise BenchError(f"--image-size must be at least 8, got {cfg.image_size}")

"""``pfpl bench``: seconds per training round of the vectorized engine against the compute pattern of
the published DP-FPL reference, on the same backbone, data and clients, in one process.

The two paths run the same method code (:data:`~pfpl.algorithms.methods.METHODS` ``["dpfpl"]``:
per-step factorization, Eq. 4 rebuild, the same loss and the same SGD-momentum state), so only the
compute pattern differs:

* **engine** — :class:`~pfpl.federation.simulator.Simulator`: image features computed once before
  timing starts; every client's ``C`` prompts go through the text tower in one call, cut to
  ``max_eot + 1`` positions; one backward for all clients.
* **reference** — :class:`ReferenceTrainer`: clients one after another; the frozen image tower re-run
  on every batch of raw (preprocessed-size) images; each client's ``C`` prompts at the full
  ``context_length`` (77) positions; one forward + backward per client.

Both follow the engine's ``sync = "step"`` semantics (local prompts step per client, the global
prompt steps on the clients' weighted-mean gradient after every step), and the reference draws each
client's factorization from the same generator stream as the engine, so one round of either leaves
the same parameters (up to float rounding) — :func:`engine_gradients` and
:meth:`ReferenceTrainer.client_gradients` expose one step's gradients for that cross-check.

The engine's text-tower throughput is its FLOPs (counted with
:class:`torch.utils.flop_counter.FlopCounterMode`, see :func:`count_flops`) over the measured time of
the text tower's forward + backward alone, against the GFLOP/s of a large fp32 matmul timed in the
same run (:func:`matmul_gflops`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from pfpl.algorithms.base import MethodSettings
from pfpl.algorithms.methods import METHODS
from pfpl.backbones import BackboneError, OpenClipBackbone, PromptTower, load_backbone, resolve_device
from pfpl.data.features import Features
from pfpl.federation.simulator import (EngineSettings, Simulator, VectorSGD, _generator, batch_gradients,
                                       mean_aggregate)

METHOD = "dpfpl"  # the default workload's method (DP-FPL)
JSON_KEYS = ("speedup", "engine_s_per_round", "reference_s_per_round", "gflops", "peak_gflops",
             "text_tower_fraction_of_peak", "reference_clients_timed")


class BenchError(ValueError):
    """A benchmark that cannot be set up as asked (one line for the user)."""


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


# ---- workload --------------------------------------------------------------------------------
_ADJECTIVES = ["red", "spotted", "golden", "northern", "great", "common", "little", "black", "striped", "giant",
               "wild", "mountain", "sea", "desert", "snowy", "painted", "crested", "barn", "grey", "water"]
_NOUNS = ["owl", "warbler", "sedan", "mushroom", "tortoise", "kingfisher", "teapot", "lighthouse", "axolotl",
          "trombone", "chickadee", "lemur", "snorkel", "toucan", "harmonica", "ibex", "pelican", "wombat",
          "dragonfly", "bison", "umbrella", "cathedral", "hedgehog", "macaw", "saxophone", "jellyfish",
          "canoe", "salamander", "gondola", "meerkat"]


def class_names(n: int) -> list[str]:
    """``n`` distinct, deterministic class names of ImageNet-like token length (one to three words)."""
    names: list[str] = []
    for i in range(len(_NOUNS) * (1 + len(_ADJECTIVES) + len(_ADJECTIVES) ** 2)):
        if len(names) == n:
            break
        noun = _NOUNS[i % len(_NOUNS)]
        k = i // len(_NOUNS)
        if k == 0:
            names.append(noun)
        elif k <= len(_ADJECTIVES):
            names.append(f"{_ADJECTIVES[k - 1]} {noun}")
        else:
            k -= len(_ADJECTIVES) + 1
            first, second = divmod(k, len(_ADJECTIVES))
            names.append(f"{_ADJECTIVES[first]} {_ADJECTIVES[second]} {noun}")
    if len(names) < n:
        raise BenchError(f"cannot make {n} distinct class names (at most {len(names)})")
    return names


def load_bench_backbone(name: str, image_size: int | None = None, device: str = "cpu") -> tuple[OpenClipBackbone, str]:
    """The frozen backbone to time and a word on its weights.

    ``embedded`` uses the committed weights when they exist and otherwise random weights of the same
    architecture (timings do not depend on the weights); any other name is an open_clip model with
    random weights. ``image_size`` rebuilds the model for that input size (random weights).
    """
    import open_clip

    from pfpl.backbones.embedded import EMBEDDED_CONFIG, EMBEDDED_NAME, build_model

    if name == EMBEDDED_NAME:
        if image_size is None:
            try:
                return load_backbone(EMBEDDED_NAME, device=device), "pretrained"
            except FileNotFoundError:
                note = "random: embedded weights not found, same architecture"
        else:
            note = "random: embedded architecture rebuilt for this image size"
        cfg = {**EMBEDDED_CONFIG, "vision_cfg": dict(EMBEDDED_CONFIG["vision_cfg"])}
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = image_size
        size = cfg["vision_cfg"]["image_size"]
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        model = build_model(cfg)
        return OpenClipBackbone(model, f"{EMBEDDED_NAME}:random", open_clip.image_transform(size, is_train=False),
                                tokenizer, device), note
    if name not in open_clip.list_models():
        raise BackboneError(f"--backbone {name!r} is neither 'embedded' nor an open_clip model (e.g. ViT-B-16, RN50)")
    model = open_clip.create_model(name, pretrained=None, device="cpu", force_image_size=image_size)
    return OpenClipBackbone(model, f"{name}:random", None, open_clip.get_tokenizer(name), device), "random"


def input_size(backbone: OpenClipBackbone) -> tuple[int, int]:
    size = getattr(backbone.model.visual, "image_size", None)
    if size is None:
        raise BenchError(f"cannot tell the input size of {backbone.name}'s image tower; pass --image-size")
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Workload:
    """Backbone, class names, clients' raw images and labels, and the image features computed once."""

    cfg: BenchConfig
    backbone: OpenClipBackbone
    weights: str
    classnames: list[str]
    images: torch.Tensor  # [N, b, 3, H, W] on the device: each client's data is one batch
    labels: torch.Tensor  # [N, b] (client c holds classes c·k … c·k + k − 1 of the full label space)
    features: torch.Tensor  # [N·b, E] on the CPU, computed once (the engine's input)
    engine_tower: PromptTower = field(repr=False)
    reference_tower: PromptTower = field(repr=False)

    @classmethod
    def build(cls, cfg: BenchConfig) -> "Workload":
        validate(cfg)
        with torch.random.fork_rng(devices=[]):  # random weights, reproducibly, without touching the global RNG
            torch.manual_seed(cfg.seed)
            backbone, weights = load_bench_backbone(cfg.backbone, cfg.image_size, cfg.device)
        if cfg.rank > min(cfg.n_ctx, backbone.ctx_dim):
            raise BenchError(f"--rank {cfg.rank} must be at most min(--n-ctx, text width) = "
                             f"{min(cfg.n_ctx, backbone.ctx_dim)}")
        names = class_names(cfg.num_classes)
        h, w = input_size(backbone)
        gen = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(cfg.clients, cfg.batch_size, 3, h, w, generator=gen).to(backbone.device)
        k = cfg.classes_per_client
        labels = torch.arange(cfg.clients)[:, None] * k + torch.arange(cfg.batch_size)[None] % k
        flat = images.flatten(0, 1)
        features = torch.cat([backbone.encode_images(flat[i:i + 64]).cpu() for i in range(0, len(flat), 64)])
        engine_tower = PromptTower(backbone, names, cfg.n_ctx, truncate=True)
        if int(engine_tower.eot.max()) >= backbone.context_length - 1:
            raise BenchError(f"--n-ctx {cfg.n_ctx} plus the longest class name do not fit the text context "
                             f"({backbone.context_length} tokens)")
        reference_tower = PromptTower(backbone, names, cfg.n_ctx, truncate=False)
        return cls(cfg, backbone, weights, names, images, labels.to(backbone.device), features,
                   engine_tower, reference_tower)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def method(self):
        return METHODS[METHOD](MethodSettings(rank=self.cfg.rank))

    def settings(self) -> EngineSettings:
        return EngineSettings(rounds=1, local_steps=self.cfg.steps, batch_size=self.cfg.batch_size, sync="step",
                              cosine=False, seed=self.cfg.seed)

    def engine(self) -> Simulator:
        """The vectorized engine on the precomputed features."""
        b = self.cfg.batch_size
        train = Features(self.features, self.labels.flatten().cpu(), torch.zeros(self.features.shape[0], dtype=torch.long))
        clients = [np.arange(c * b, (c + 1) * b) for c in range(self.cfg.clients)]
        sim = Simulator(self.method(), self.engine_tower, train, clients, self.settings(), self.backbone.logit_scale)
        _place_engine(sim, self.device)
        return sim

    def reference(self) -> "ReferenceTrainer":
        return ReferenceTrainer(self)

    @property
    def engine_positions(self) -> int:
        return int(self.engine_tower.prefix.shape[1] + self.engine_tower.n_ctx + self.engine_tower.suffix.shape[1])

    @property
    def reference_positions(self) -> int:
        return int(self.reference_tower.prefix.shape[1] + self.reference_tower.n_ctx
                   + self.reference_tower.suffix.shape[1])


def _place_engine(sim: Simulator, device: torch.device) -> None:
    """Move a Simulator's state to ``device`` (the Simulator builds it on the CPU)."""
    if device.type == "cpu":
        return
    sim.params = {k: v.to(device) for k, v in sim.params.items()}
    sim.sizes = sim.sizes.to(device)
    sim.train = Features(sim.train.features.to(device), sim.train.labels.to(device), sim.train.domains.to(device))
    batches = sim.batches
    sim.batches = lambda r, active: [tuple(t.to(device) for t in step) for step in batches(r, active)]


class ReferenceTrainer:
    """The published reference's compute pattern with pfpl's method code: clients one after another,
    the image tower on every batch, full-length text sequences, one forward + backward per client."""

    def __init__(self, workload: Workload):
        self.w = workload
        self.method = workload.method()
        self.s = workload.settings()
        cfg, device = workload.cfg, workload.device
        params = self.method.init(cfg.clients, cfg.n_ctx, workload.backbone.ctx_dim, _generator(self.s.seed, 7))
        self.params = {k: v.to(device) for k, v in params.items()}
        self.sizes = torch.full((cfg.clients,), float(cfg.batch_size), device=device)
        self.opt = VectorSGD(self.s.momentum, self.s.weight_decay)
        self.round = 0
        # what batch_gradients reads from a simulator
        self.loss_context = SimpleNamespace(scale=workload.backbone.logit_scale, method=self.method,
                                            tower=workload.reference_tower, reference=None)

    def client_gradients(self, c: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One client's step: image tower on its raw batch, its C prompts at full length, forward + backward.
        Returns its parameters' gradients (leading dimension 1), its class text features [1, C, E] and loss."""
        x = self.w.backbone.encode_images(self.w.images[c])[None]  # [1, b, E], recomputed every batch
        y = self.w.labels[c][None]
        mask = torch.ones_like(y, dtype=x.dtype)
        sliced = {n: self.params[n].expand(1, *self.params[n].shape) for n in self.method.global_params}
        sliced.update({n: self.params[n][c:c + 1] for n in self.method.local_params})
        views = self.method.views(sliced, gen)
        text = self.w.reference_tower(views.ctx[:, None])
        leaf_grads, loss = batch_gradients(self.loss_context, views, text, x, y, mask)
        return self.method.param_grads(views, leaf_grads), text.detach(), loss

    def run_round(self, clients: list[int] | None = None) -> None:
        """``steps`` steps; in each, the clients train one after another, then the server steps the global
        prompt on their weighted-mean gradient (the engine's ``sync = "step"``)."""
        clients = list(range(self.w.cfg.clients)) if clients is None else list(clients)
        lr = self.s.lr
        for step in range(self.s.local_steps):
            gen = _generator(self.s.seed, 17, self.round, step)  # drawn client by client, as the engine draws them
            global_grads: dict[str, list[torch.Tensor]] = {n: [] for n in self.method.global_params}
            for c in clients:
                grads, _, _ = self.client_gradients(c, gen)
                with torch.no_grad():
                    index = torch.tensor([c])
                    for name in self.method.local_params:
                        self.opt.step(name, self.params[name], grads[name], lr, index)
                for name in self.method.global_params:
                    global_grads[name].append(grads[name])
            with torch.no_grad():
                weights = self.sizes[clients]
                for name, parts in global_grads.items():
                    self.opt.step(name, self.params[name], mean_aggregate(torch.cat(parts), weights), lr)
        self.round += 1


def engine_gradients(sim: Simulator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The gradients the engine's next step would apply (the body of one step of ``Simulator.run_round``,
    without the optimizer): parameter gradients [N, ...], class text features [N, C, E] and losses [N]."""
    r = sim.round
    active = sim.participants(r)
    x, y, mask = sim.batches(r, active)[0]
    views = sim.method.views(sim._slice(active, None), _generator(sim.s.seed, 17, r, 0))
    text = sim.tower(views.ctx[:, None])
    leaf_grads, loss = sim.gradients(sim, views, text, x, y, mask)
    return sim.method.param_grads(views, leaf_grads), text.detach(), loss


# ---- FLOPs and peak ----------------------------------------------------------------------------
def _flop_mapping() -> dict:
    """FlopCounterMode formulas for the CPU flash-attention kernels, which torch does not register
    (forward: QKᵀ and PV; backward: dV, dP, dQ, dK — torch's own SDPA formulas)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    mapping = {}
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query, key, value)

        mapping[ops._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[ops._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and attention ``fn`` executes (forward and backward), as counted by
    FlopCounterMode (1 multiply-add = 2 FLOPs; elementwise ops, norms and softmax are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def text_tower_flops_analytic(backbone: OpenClipBackbone, sequences: int, length: int) -> int | None:
    """The analytic count for one forward + input-gradient backward of the text tower, as a cross-check
    of :func:`count_flops`. Per layer, for ``n`` sequences of ``L`` positions, width ``d``, MLP width ``h``:

    forward  = n·L·2·(4d² + 2dh)  [QKV + out projections, MLP]  +  n·4·L²·d  [QKᵀ and PV, dense over L²]
    backward = n·L·2·(4d² + 2dh)  [input gradients only: the weights are frozen, so 1× the forward]
             + n·10·L²·d          [flash backward: QKᵀ recomputed, then dP, dV, dQ, dK: 2.5× the forward]

    plus the final projection to E at the pooled token, 2·n·d·E forward and as much backward. The causal
    mask is not credited (the kernels compute the full L² scores). Norms, softmax and GELU are not counted.
    """
    blocks = getattr(backbone.text.transformer, "resblocks", None)
    if not blocks:
        return None
    try:
        d = int(backbone.text.transformer.width)
        h = int(blocks[0].mlp.c_fc.out_features)
    except AttributeError:
        return None
    proj = backbone.text.text_projection
    e = 0 if proj is None else int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1])
    n, lyr = sequences, len(blocks)
    projections = n * length * 2 * (4 * d * d + 2 * d * h)
    attention = n * 2 * length * length * d  # one L×L×d matmul per sequence
    return lyr * (2 * projections + 7 * attention) + 2 * (2 * n * d * e)


def default_peak_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def matmul_gflops(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, tries: int = 3) -> float:
    """Best GFLOP/s of ``tries`` fp32 ``a @ b`` (2·n³ FLOPs each)."""
    n, k = a.shape
    m = b.shape[1]
    best = min(_timed(lambda: torch.mm(a, b, out=out), a.device) for _ in range(tries))
    return 2 * n * k * m / best / 1e9


# ---- the benchmark -------------------------------------------------------------------------------
def validate(cfg: BenchConfig) -> None:
    for name in ("clients", "classes_per_client", "batch_size", "n_ctx", "rank", "steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.reference_clients is not None and not 1 <= cfg.reference_clients <= cfg.clients:
        raise BenchError(f"--reference-clients must be between 1 and --clients ({cfg.clients}), "
                         f"got {cfg.reference_clients}")
    if cfg.rank > cfg.n_ctx:
        raise BenchError(f"--rank {cfg.rank} must be at most --n-ctx {cfg.n_ctx}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available; use --device cpu")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise BenchError(f"--image-size must be at least 8, got {cfg.image_size}")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Time the engine and the reference (interleaved, after one warm-up round each) and return the report."""
    log = log or (lambda message: None)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg = BenchConfig(**{**asdict(cfg), "device": resolve_device(cfg.device)})
    log(f"building the workload: {cfg.backbone}, encoding {cfg.clients}×{cfg.batch_size} images once for the engine")
    w = Workload.build(cfg)
    device = w.device
    engine, reference = w.engine(), w.reference()
    k = cfg.timed_reference_clients
    timed_clients = list(range(k))

    # the engine's text tower alone, at the engine's shapes: all clients' C prompts, forward + input gradient
    ctx = engine.personalized_context().detach().clone().requires_grad_(True)  # [N, M, D]
    probe = torch.randn(cfg.clients, cfg.num_classes, w.features.shape[1], generator=torch.Generator().manual_seed(1))
    probe = probe.to(device)

    def text_tower_pass() -> None:
        features = w.engine_tower(ctx[:, None])
        torch.autograd.grad(features, ctx, grad_outputs=probe)

    size = cfg.peak_size or default_peak_size(device)
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    out = torch.empty(size, size, device=device)

    log("warm-up (counting FLOPs): engine round, reference round, text tower, matmul")
    engine_flops = count_flops(engine.run_round)
    reference_flops = count_flops(lambda: reference.run_round(timed_clients))
    text_flops = count_flops(text_tower_pass)
    matmul_gflops(a, b, out, tries=1)

    engine_s, reference_s, text_s, peaks = [], [], [], []
    for i in range(cfg.repeats):
        engine_s.append(_timed(engine.run_round, device))
        reference_s.append(_timed(lambda: reference.run_round(timed_clients), device))
        text_s.append(_timed(text_tower_pass, device))
        peaks.append(matmul_gflops(a, b, out))
        log(f"repeat {i + 1}/{cfg.repeats}: engine {engine_s[-1]:.3f} s, reference ({k} of {cfg.clients} clients) "
            f"{reference_s[-1]:.3f} s, text tower {text_s[-1]:.4f} s, matmul {peaks[-1]:.1f} GFLOP/s")

    engine_round = statistics.median(engine_s)
    reference_measured = statistics.median(reference_s)
    reference_round = reference_measured * cfg.clients / k
    text_step = statistics.median(text_s)
    gflops = text_flops / text_step / 1e9
    peak = max(peaks)
    analytic = text_tower_flops_analytic(w.backbone, cfg.num_classes * cfg.clients, w.engine_positions)
    result = {
        "speedup": reference_round / engine_round,
        "engine_s_per_round": engine_round,
        "reference_s_per_round": reference_round,
        "gflops": gflops,
        "peak_gflops": peak,
        "text_tower_fraction_of_peak": gflops / peak,
        "reference_clients_timed": k,
        "reference_s_measured": reference_measured,
        "text_tower_s_per_step": text_step,
        "text_tower_share_of_engine_round": cfg.steps * text_step / engine_round,
        "text_tower_gflop_per_step": text_flops / 1e9,
        "text_tower_gflop_per_step_analytic": None if analytic is None else analytic / 1e9,
        "engine_gflop_per_round": engine_flops / 1e9,
        "reference_gflop_per_round": reference_flops * cfg.clients / k / 1e9,
        "samples": {"engine_s": engine_s, "reference_s_measured": reference_s, "text_tower_s": text_s,
                    "matmul_gflops": peaks},
        "workload": {
            "backbone": cfg.backbone, "weights": w.weights, "method": METHOD, "device": str(device),
            "threads": torch.get_num_threads(), "clients": cfg.clients,
            "classes_per_client": cfg.classes_per_client, "classes": cfg.num_classes,
            "batch_size": cfg.batch_size, "n_ctx": cfg.n_ctx, "rank": cfg.rank, "steps": cfg.steps,
            "repeats": cfg.repeats, "image_size": list(input_size(w.backbone)),
            "engine_text_positions": w.engine_positions, "reference_text_positions": w.reference_positions,
            "peak_matmul": f"{size}x{size} @ {size}x{size} fp32",
        },
    }
    bad = [key for key in ("speedup", "engine_s_per_round", "reference_s_per_round", "gflops", "peak_gflops")
           if not (math.isfinite(result[key]) and result[key] > 0)]
    if bad:
        raise BenchError(f"non-positive or non-finite measurement(s): {', '.join(bad)} (timer resolution?)")
    return result


def run_dp_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Seconds per engine round of a DP step against a non-private one, interleaved in one process.

    ``feature``: clipped per-sample text-feature gradients, one backward; ``per-sample``: exact
    per-sample gradients of DP-FPL's u, v (vmapped backward over per-sample cotangents) plus
    per-sample clipping of the global gradient and GDP noise at the server.
    """
    from pfpl.privacy.mechanisms import DPSettings, Privatizer

    workload = Workload.build(cfg)
    sims = {}
    for mode in ("off", "feature", "per-sample"):
        sim = workload.engine()
        if mode != "off":
            dp = DPSettings(mode=mode, clip=10.0, noise_multiplier=1.0,
                            global_noise_multiplier=1.0 if mode == "per-sample" else 0.0)
            priv = Privatizer(dp, sim.expected_batch(), sim.method.private_leaves, sim.method.global_params)
            sim.gradients, sim.aggregate = priv.gradients, priv.aggregate
        sims[mode] = sim
    for mode, sim in sims.items():  # warm-up
        if log:
            log(f"warm-up: {mode}")
        sim.run_round()
    samples: dict[str, list[float]] = {m: [] for m in sims}
    for r in range(cfg.repeats):
        for mode, sim in sims.items():
            samples[mode].append(_timed(sim.run_round, workload.device))
        if log:
            log(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(f"{m} {v[-1]:.3f}s" for m, v in samples.items()))
    med = {m: float(np.median(v)) for m, v in samples.items()}
    return {"feature_overhead": med["feature"] / med["off"], "per_sample_overhead": med["per-sample"] / med["off"],
            "non_private_s_per_round": med["off"], "feature_s_per_round": med["feature"],
            "per_sample_s_per_round": med["per-sample"], "samples": samples,
            "workload": {"backbone": cfg.backbone, "clients": cfg.clients, "classes": cfg.num_classes,
                         "batch_size": cfg.batch_size, "n_ctx": cfg.n_ctx, "rank": cfg.rank, "steps": cfg.steps,
                         "method": METHOD, "threads": torch.get_num_threads()}}


def format_report(result: dict) -> str:
    wl = result["workload"]
    k, n = result["reference_clients_timed"], wl["clients"]
    scaled = "" if k == n else f"  ({k} of {n} clients timed: {result['reference_s_measured']:.3f} s, ×{n / k:g})"
    h, w = wl["image_size"]
    kind, _, why = wl["weights"].partition(": ")
    weights = f"{kind} weights" + (f": {why}" if why else "")
    lines = [
        f"pfpl bench — {wl['backbone']} ({weights}) at {h}×{w} px, {n} clients × "
        f"{wl['classes_per_client']} classes ({wl['classes']} in all), batch {wl['batch_size']}, "
        f"{wl['n_ctx']} context tokens, rank {wl['rank']}, {wl['method']}, {wl['steps']} step(s) per round; "
        f"{wl['device']}, {wl['threads']} thread(s); median of {wl['repeats']}",
        f"  engine      s/round   {result['engine_s_per_round']:10.4f}",
        f"  reference   s/round   {result['reference_s_per_round']:10.4f}{scaled}",
        f"  speedup               {result['speedup']:10.1f} ×",
        f"  text tower  GFLOP/s   {result['gflops']:10.1f}  ({result['text_tower_gflop_per_step']:.3f} GFLOP per step, "
        f"{wl['engine_text_positions']} of {wl['reference_text_positions']} positions, "
        f"{result['text_tower_share_of_engine_round']:.0%} of the engine's round)",
        f"  matmul peak GFLOP/s   {result['peak_gflops']:10.1f}  ({wl['peak_matmul']})",
        f"  text tower / peak     {result['text_tower_fraction_of_peak']:10.1%}",
    ]
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Register ``pfpl bench`` on an argparse subparsers object."""
    d = BenchConfig()
    p = subparsers.add_parser(
        "bench", help="seconds per round: the engine against the published reference's compute pattern",
        description="Seconds per round of the vectorized engine and of the published DP-FPL reference's compute "
                    "pattern (clients one after another, image tower on every batch, 77-position text sequences) "
                    "on the same backbone, data and clients, and the engine's text-tower GFLOP/s against a "
                    "matmul peak measured in the same run. open_clip models get random weights "
                    "(timings do not depend on them).")
    p.add_argument("--backbone", default=d.backbone,
                   help="open_clip model name, or 'embedded' for the embedded model (default: %(default)s)")
    p.add_argument("--clients", type=_positive_int, default=d.clients, help="default: %(default)s")
    p.add_argument("--classes-per-client", type=_positive_int, default=d.classes_per_client,
                   help="classes per client; the label space has clients × this many (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--n-ctx", type=_positive_int, default=d.n_ctx, help="context tokens (default: %(default)s)")
    p.add_argument("--rank", type=_positive_int, default=d.rank,
                   help="DP-FPL factorization rank (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=d.steps,
                   help="local steps per client per round (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=d.repeats,
                   help="timed rounds per path; the median is reported (default: %(default)s)")
    p.add_argument("--reference-clients", type=_positive_int, metavar="K",
                   help="time only K clients of the reference and scale to all (its round is linear in clients; "
                        "default: all)")
    p.add_argument("--image-size", type=_positive_int, help="input size in pixels (default: the model's)")
    p.add_argument("--peak-size", type=_positive_int,
                   help="side of the square fp32 matmul for the peak (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d.device, help="default: %(default)s")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--dp", action="store_true",
                   help="time DP steps (feature, per-sample) against a non-private step instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench, bench_parser=p)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(backbone=args.backbone, clients=args.clients, classes_per_client=args.classes_per_client,
                       batch_size=args.batch_size, n_ctx=args.n_ctx, rank=args.rank, steps=args.steps,
                       repeats=args.repeats, reference_clients=args.reference_clients, image_size=args.image_size,
                       device=args.device, peak_size=args.peak_size, threads=args.threads)


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    parser = getattr(args, "bench_parser", None)
    try:
        validate(cfg)
    except ValueError as exc:
        if parser is not None:
            parser.error(str(exc))  # exits 2 with one error line
        raise
    log = (lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    try:
        result = run_dp_bench(cfg, log) if args.dp else run_bench(cfg, log)
    except ValueError as exc:  # BenchError, BackboneError, a prompt that does not fit the text context
        print(f"pfpl bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.dp:
        print(f"DP step cost on {cfg.backbone} ({cfg.clients} clients × {cfg.num_classes} classes, batch "
              f"{cfg.batch_size}): non-private {result['non_private_s_per_round']:.3f} s/round; "
              f"feature {result['feature_s_per_round']:.3f} s ({result['feature_overhead']:.2f}×); "
              f"per-sample {result['per_sample_s_per_round']:.3f} s ({result['per_sample_overhead']:.2f}×)")
    else:
        print(format_report(result))
    return 0

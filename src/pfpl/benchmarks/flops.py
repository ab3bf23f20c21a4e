"""FLOP counting (FlopCounterMode with the CPU flash-attention kernels registered), the analytic
text-tower count that cross-checks it, and the fp32 matmul peak the text tower is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pfpl.backbones import OpenClipBackbone


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
    best = min(timed(lambda: torch.mm(a, b, out=out), a.device) for _ in range(tries))
    return 2 * n * k * m / best / 1e9

"""The "shapes world": a seeded, procedural image world with captions.

Classes are ``{colour} {shape}`` pairs; rendering styles act as data domains. Every image is a
pure function of ``(seed, stream, index)``, so the same seed gives the same pixels bit for bit,
whatever order images are asked for in and however many processes render them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "diamond",
    "ring",
    "crescent",
    "arrow",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 40),
}
STYLES: tuple[str, ...] = ("photo", "sketch", "painting", "clipart", "night")

# How the benchmark names its classes. "caption" uses the captions' everyday colour words;
# "curated" (the benchmark default) names two of the four colours with words no pretraining caption
# ever uses, as fine-grained datasets name classes with words CLIP rarely saw. The image features
# separate those classes just as well (a probe does not read names), but the hand-crafted prompt
# cannot: that is the gap prompt learning has to close (docs/embedded.md).
CURATED_COLOUR_NAMES: dict[str, str] = {"red": "crimson", "green": "green", "blue": "azure", "yellow": "yellow"}
NAMINGS: tuple[str, ...] = ("curated", "caption")

STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "photo": ("photo", "picture", "snapshot"),
    "sketch": ("sketch", "pencil drawing", "line drawing"),
    "painting": ("painting", "oil painting", "watercolor"),
    "clipart": ("clipart", "cartoon", "icon"),
    "night": ("photo at night", "dark photo", "night picture"),
}
_STYLED_TEMPLATES = ("a {style} of a {cls}.", "{cls}, {style}.", "a {cls} in a {style}.")
_PLAIN_TEMPLATES = ("a {cls}.", "the {shape} is {colour}.", "a {shape} coloured {colour}.")
# Colours are hard to see at night and paintings are described by their subject, so those
# captions often leave the colour out: the hand-crafted "a photo of a {colour} {shape}." fits
# night images and paintings worse, which gives (domain-level) prompts something to learn.
COLOUR_MENTION_RATE: dict[str, float] = {"night": 0.35}
# Scenes often have a background in one of the class colours, which captions sometimes name
# ("a red star on a blue background"). A hand-crafted prompt then has to bind the colour to the
# object, a classic weakness of CLIP-style zero-shot that a probe or a learned prompt can overcome.
BACKGROUND_STYLES = ("photo", "painting", "clipart")
BACKGROUND_COLOUR_RATE = 0.5
BACKGROUND_MENTION_RATE = 0.5

# Bump when rendering changes: it is part of every dataset fingerprint.
RENDER_VERSION = 2
_STREAMS = {"pretrain": 0, "train": 1, "val": 2, "test": 3}


def class_names(naming: str = "caption") -> list[str]:
    """All class names, ordered colour-major: ``red circle, red square, …`` (``naming="caption"``)
    or ``crimson circle, …`` (``naming="curated"``)."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown class naming {naming!r}; known: {', '.join(NAMINGS)}")
    words = CURATED_COLOUR_NAMES if naming == "curated" else {c: c for c in COLOURS}
    return [f"{words[c]} {s}" for c in COLOURS for s in SHAPES]


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """Filled mask of one shape, drawn at ``size`` pixels (callers supersample)."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        q = 0.55 * r
        d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif shape == "crescent":
        d.ellipse(box, fill=255)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        d.ellipse((cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy), fill=0)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, [r] * 4, angle), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, [r * 1.1] * 3, angle), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, [r] * 6, angle), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45] * 5, angle), fill=255)
    elif shape == "diamond":
        pts = [(0, -r * 1.1), (r * 0.6, 0), (0, r * 1.1), (-r * 0.6, 0)]
        d.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "cross":
        a, b = r, r * 0.33
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        d.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "arrow":
        pts = [
            (-r, -0.28 * r),
            (0.15 * r, -0.28 * r),
            (0.15 * r, -0.75 * r),
            (r, 0),
            (0.15 * r, 0.75 * r),
            (0.15 * r, 0.28 * r),
            (-r, 0.28 * r),
        ]
        d.polygon(_rotate(pts, cx, cy, angle), fill=255)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _blotches(rng: np.random.Generator, size: int, grid: int, lo: float, hi: float) -> np.ndarray:
    """Low-frequency colour noise: a random grid upsampled smoothly."""
    g = rng.uniform(lo, hi, size=(grid, grid, 3))
    img = Image.fromarray((g * 255).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def render(
    shape: str, colour: str, style: str, rng: np.random.Generator, size: int = 64, background: str | None = None
) -> np.ndarray:
    """Render one image as uint8 ``[size, size, 3]``; ``background`` names a class colour for the scene."""
    ss = 2 * size  # supersampled canvas for anti-aliasing
    r = rng.uniform(0.22, 0.36) * ss
    margin = r * 1.15
    cx, cy = rng.uniform(margin, ss - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    fill_hi = _shape_mask(shape, ss, cx, cy, r, angle)
    edge_width = int(rng.integers(3, 6))
    edge_hi = fill_hi.filter(ImageFilter.MaxFilter(2 * (edge_width // 2) + 1))
    edge_arr = np.asarray(edge_hi, np.int16) - np.asarray(fill_hi.filter(ImageFilter.MinFilter(3)), np.int16)
    edge_hi = Image.fromarray(np.clip(edge_arr, 0, 255).astype(np.uint8), "L")
    fill = np.asarray(fill_hi.resize((size, size), Image.BOX), np.float32)[..., None] / 255.0
    edge = np.asarray(edge_hi.resize((size, size), Image.BOX), np.float32)[..., None] / 255.0

    base = np.array(COLOURS[colour], np.float32) / 255.0
    col = np.clip(base + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    bg_tint = None if background is None else np.array(COLOURS[background], np.float32) / 255.0
    if style == "photo":
        c0, c1 = rng.uniform(0.25, 0.75, size=(2, 3))
        if bg_tint is not None:
            c0, c1 = 0.3 * c0 + 0.7 * bg_tint, 0.3 * c1 + 0.7 * bg_tint
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
        bg = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
        light = 0.8 + 0.4 * ((xx - cx / ss) * rng.uniform(-1, 1) + (yy - cy / ss) * rng.uniform(-1, 1))[..., None]
        obj = np.clip(col * light, 0, 1)
        img = bg * (1 - fill) + obj * fill + rng.normal(0, 0.03, (size, size, 3))
    elif style == "sketch":
        paper = rng.uniform(0.88, 1.0)
        bg = np.full((size, size, 3), paper, np.float32) + rng.normal(0, 0.02, (size, size, 3))
        hatch = ((np.floor((xx + yy) * size / rng.uniform(3, 5)) % 2) == 0).astype(np.float32)[..., None]
        ink = col * 0.85
        img = bg * (1 - edge) + ink * edge
        img = img * (1 - 0.35 * fill * hatch * (1 - edge)) + 0.35 * ink * fill * hatch * (1 - edge)
    elif style == "painting":
        bg = _blotches(rng, size, 4, 0.25, 0.8)
        if bg_tint is not None:
            bg = 0.35 * bg + 0.65 * bg_tint
        obj = np.clip(col + _blotches(rng, size, 6, 0.0, 0.24) - 0.12, 0, 1)
        soft = (
            np.asarray(
                Image.fromarray((fill[..., 0] * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2)),
                np.float32,
            )[..., None]
            / 255.0
        )
        img = bg * (1 - soft) + obj * soft + rng.normal(0, 0.05, (size, size, 3))
        img = (
            np.asarray(
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB").filter(
                    ImageFilter.GaussianBlur(0.6)
                ),
                np.float32,
            )
            / 255.0
        )
    elif style == "clipart":
        bg = np.ones((size, size, 3), np.float32) * rng.uniform(0.75, 1.0, 3)
        if bg_tint is not None:
            bg = 0.25 * bg + 0.75 * bg_tint
        img = bg * (1 - fill) + col * fill
        img = img * (1 - edge) + 0.05 * edge
    elif style == "night":
        bg = rng.uniform(0.02, 0.12) + _blotches(rng, size, 3, 0.0, 0.08)
        tint = np.array([0.75, 0.85, 1.1], np.float32)
        obj = col * rng.uniform(0.25, 0.45) * tint
        img = bg * (1 - fill) + obj * fill + rng.normal(0, 0.04, (size, size, 3))
    else:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def caption(
    shape: str,
    colour: str,
    style: str,
    rng: np.random.Generator,
    style_rate: float = 0.6,
    background: str | None = None,
) -> str:
    """A caption that names the shape, the colour (always, except often at night), with probability
    ``style_rate`` the style, and sometimes a coloured background."""
    text = _caption(shape, colour, style, rng, style_rate)
    if background is not None and rng.random() < BACKGROUND_MENTION_RATE:
        text = text[:-1] + f" on a {background} background."
    return text


def _caption(shape: str, colour: str, style: str, rng: np.random.Generator, style_rate: float) -> str:
    cls = f"{colour} {shape}"
    if rng.random() >= COLOUR_MENTION_RATE.get(style, 1.0):
        cls = shape
        if rng.random() < style_rate:
            words = STYLE_WORDS[style]
            return f"a {words[int(rng.integers(len(words)))]} of a {shape}."
        return f"a {shape}."
    if rng.random() < style_rate:
        words = STYLE_WORDS[style]
        template = _STYLED_TEMPLATES[int(rng.integers(len(_STYLED_TEMPLATES)))]
        return template.format(cls=cls, style=words[int(rng.integers(len(words)))])
    template = _PLAIN_TEMPLATES[int(rng.integers(len(_PLAIN_TEMPLATES)))]
    return template.format(cls=cls, shape=shape, colour=colour)


@dataclass(frozen=True)
class WorldSpec:
    """Recipe of one stream of the world; its fingerprint keys feature caches."""

    seed: int = 0
    image_size: int = 64

    def fingerprint(self) -> str:
        text = f"shapes-world/v{RENDER_VERSION}/seed={self.seed}/size={self.image_size}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], index]))


def sample_layout(n_per_class_domain: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, domains) for a balanced stream: every class × style ``n`` times, class-major."""
    n_cls, n_dom = len(COLOURS) * len(SHAPES), len(STYLES)
    labels = np.repeat(np.arange(n_cls), n_dom * n_per_class_domain)
    domains = np.tile(np.repeat(np.arange(n_dom), n_per_class_domain), n_cls)
    return labels.astype(np.int64), domains.astype(np.int64)


def background_item(spec: WorldSpec, stream: str, index: int, label: int, domain: int) -> str | None:
    """The class colour of image ``index``'s background, if it has one (never the object's colour)."""
    if STYLES[domain] not in BACKGROUND_STYLES:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _STREAMS[stream], index, 7]))
    if rng.random() >= BACKGROUND_COLOUR_RATE:
        return None
    others = [c for c in COLOURS if c != list(COLOURS)[label // len(SHAPES)]]
    return others[int(rng.integers(len(others)))]


def render_item(spec: WorldSpec, stream: str, index: int, label: int, domain: int) -> np.ndarray:
    """Image ``index`` of a stream; a pure function of its arguments."""
    colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    background = background_item(spec, stream, index, label, domain)
    return render(shape, colour, STYLES[domain], _rng(spec.seed, stream, index), spec.image_size, background)


def caption_item(spec: WorldSpec, index: int, label: int, domain: int, epoch: int, style_rate: float = 0.6) -> str:
    """Caption of pretraining image ``index``; a fresh wording each epoch."""
    colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 99, index, epoch]))
    background = background_item(spec, "pretrain", index, label, domain)
    return caption(shape, colour, STYLES[domain], rng, style_rate, background)


def render_stream(spec: WorldSpec, stream: str, labels: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """Render a whole stream as uint8 ``[N, H, W, 3]``."""
    out = np.empty((len(labels), spec.image_size, spec.image_size, 3), np.uint8)
    for i, (y, d) in enumerate(zip(labels.tolist(), domains.tolist())):
        out[i] = render_item(spec, stream, i, y, d)
    return out


def _render_chunk(args: tuple[WorldSpec, str, list[int], list[int], list[int]]) -> np.ndarray:
    spec, stream, idx, labels, domains = args
    return np.stack([render_item(spec, stream, i, y, d) for i, y, d in zip(idx, labels, domains)])


def render_parallel(spec: WorldSpec, stream: str, labels: np.ndarray, domains: np.ndarray, workers: int) -> np.ndarray:
    """Same pixels as :func:`render_stream`, rendered by ``workers`` processes."""
    n = len(labels)
    if workers <= 1 or n < 512:
        return render_stream(spec, stream, labels, domains)
    bounds = np.linspace(0, n, 8 * workers + 1).astype(int)
    jobs = [
        (spec, stream, list(range(a, b)), labels[a:b].tolist(), domains[a:b].tolist())
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    with get_context("spawn").Pool(workers) as pool:
        return np.concatenate(pool.map(_render_chunk, jobs))

import numpy as np
import pytest

from pfpl.data import shapes
from pfpl.data.shapes_dataset import ShapesDataset


def test_world_has_enough_classes_and_styles():
    assert len(shapes.class_names()) >= 40
    assert len(set(shapes.class_names())) == len(shapes.class_names())
    assert len(shapes.STYLES) >= 4


def test_same_seed_same_images_bit_for_bit():
    labels, domains = shapes.sample_layout(1)
    a = shapes.render_stream(shapes.WorldSpec(seed=5, image_size=32), "train", labels[:60], domains[:60])
    b = shapes.render_stream(shapes.WorldSpec(seed=5, image_size=32), "train", labels[:60], domains[:60])
    assert a.tobytes() == b.tobytes()
    c = shapes.render_stream(shapes.WorldSpec(seed=6, image_size=32), "train", labels[:60], domains[:60])
    assert a.tobytes() != c.tobytes()


def test_streams_differ_and_parallel_rendering_is_identical():
    spec = shapes.WorldSpec(seed=0, image_size=32)
    labels, domains = shapes.sample_layout(3)
    serial = shapes.render_stream(spec, "test", labels, domains)
    parallel = shapes.render_parallel(spec, "test", labels, domains, workers=2)
    assert serial.tobytes() == parallel.tobytes()
    other = shapes.render_stream(spec, "val", labels, domains)
    assert serial.tobytes() != other.tobytes()


def test_image_is_independent_of_what_was_rendered_before():
    spec = shapes.WorldSpec(seed=2, image_size=32)
    labels, domains = shapes.sample_layout(1)
    whole = shapes.render_stream(spec, "train", labels, domains)
    assert np.array_equal(whole[17], shapes.render_item(spec, "train", 17, int(labels[17]), int(domains[17])))


def test_captions_name_the_class_and_often_the_style():
    spec = shapes.WorldSpec(seed=0)
    with_style = 0
    for i in range(200):
        label, domain = i % 40, i % 5
        cap = shapes.caption_item(spec, i, label, domain, epoch=0)
        colour, shape = shapes.class_names()[label].split()
        assert shape in cap
        assert colour in cap or shapes.STYLES[domain] in shapes.COLOUR_MENTION_RATE
        with_style += any(w in cap for w in shapes.STYLE_WORDS[shapes.STYLES[domain]])
    assert 0.4 < with_style / 200 < 0.8


def test_dataset_interface_and_fingerprint():
    ds = ShapesDataset(seed=0, per_class_domain={"train": 2, "val": 1, "test": 1}, image_size=32)
    split = ds.split("train")
    assert len(split) == 40 * 5 * 2
    assert set(split.labels.tolist()) == set(range(40)) and set(split.domains.tolist()) == set(range(5))
    img = split.load(3)
    assert img.size == (32, 32) and img.mode == "RGB"
    same = ShapesDataset(seed=0, per_class_domain={"train": 2, "val": 1, "test": 1}, image_size=32)
    assert same.fingerprint == ds.fingerprint
    assert ShapesDataset(seed=1, image_size=32).fingerprint != ds.fingerprint
    assert ShapesDataset(seed=0, per_class_domain={"train": 3}, image_size=32).fingerprint != ds.fingerprint


def test_backgrounds_use_another_class_colour_and_captions_sometimes_name_them():
    spec = shapes.WorldSpec(seed=0)
    labels, domains = shapes.sample_layout(4)
    seen, named = 0, 0
    for i, (y, d) in enumerate(zip(labels.tolist(), domains.tolist())):
        bg = shapes.background_item(spec, "pretrain", i, y, d)
        if shapes.STYLES[d] not in shapes.BACKGROUND_STYLES:
            assert bg is None
            continue
        if bg is None:
            continue
        seen += 1
        assert bg != shapes.class_names()[y].split()[0]
        named += f"on a {bg} background" in shapes.caption_item(spec, i, y, d, epoch=0)
    assert 0.35 < seen / (len(labels) * 3 / 5) < 0.65
    assert 0.3 < named / seen < 0.7


def test_curated_class_names_use_words_no_pretraining_caption_contains():
    """The benchmark's curated colour names are the words the embedded model never read."""
    curated = shapes.class_names("curated")
    assert len(curated) == len(shapes.class_names()) == len(set(curated))
    assert [c.split()[1] for c in curated] == [c.split()[1] for c in shapes.class_names()]
    unseen = {w for c, w in shapes.CURATED_COLOUR_NAMES.items() if w != c}
    assert len(unseen) == 2
    spec = shapes.WorldSpec(seed=0)
    labels, domains = shapes.sample_layout(2)
    for epoch in range(2):
        for i, (y, d) in enumerate(zip(labels.tolist(), domains.tolist())):
            words = set(shapes.caption_item(spec, i, y, d, epoch).replace(",", " ").replace(".", " ").split())
            assert not words & unseen
    assert ShapesDataset(image_size=32).classnames == curated
    assert ShapesDataset(image_size=32, naming="caption").classnames == shapes.class_names()
    with pytest.raises(ValueError, match="unknown class naming 'fancy'"):
        shapes.class_names("fancy")

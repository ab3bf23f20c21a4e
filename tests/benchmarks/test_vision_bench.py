"""``pfpl bench --vision``: one row of each kind runs, and the image budget sets the calls' width."""

import pytest

from pfpl.benchmarks.vision import format_vision, measure


@pytest.mark.slow
def test_vision_bench_rows_run_and_the_image_budget_bounds_the_calls():
    text = measure(3, "text", 4096, steps=1, repeats=1, device="cpu")
    vision = measure(3, "vision", 32, steps=1, repeats=1, device="cpu")  # one client of batch 32 per call
    assert vision["clients_per_call"] == 1 and text["clients_per_call"] >= 3
    assert vision["s_per_round"] > 0 and text["s_per_round"] > 0
    for r in (text, vision):
        r["ratio_to_text"] = r["s_per_round"] / text["s_per_round"]
    result = {"rows": [text, vision], "workload": {**_workload(), "device": "cpu", "threads": text["threads"]}}
    table = format_vision(result)
    assert "vision" in table and f"{vision['ratio_to_text']:.2f}" in table


def _workload() -> dict:
    return {
        "backbone": "embedded-vit (random weights)",
        "method": "dpfpl",
        "sync": "step",
        "classes": 40,
        "classes_per_client": 4,
        "records_per_client": 64,
        "batch_size": 32,
        "steps": 1,
        "repeats": 1,
    }

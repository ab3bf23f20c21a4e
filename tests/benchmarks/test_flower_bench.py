import math

import pytest

from pfpl.errors import BenchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_flower_bench_times_both_paths_and_flowers_own_secaggplus():
    from pfpl.benchmarks.flower import format_flower, run_flower_bench

    tiny = ("federation.rounds=1", "federation.local_steps=1", "prompt.n_ctx=4", "train.rank=2")
    with pytest.raises(BenchError, match="at least 3 SuperNodes"):
        run_flower_bench(supernodes=2)
    result = run_flower_bench(supernodes=3, overrides=tiny)
    assert result["simulator_round_s"] > 0 and result["rows"]["flower"]["round_s"] > 0
    secure = result["rows"]["flower + secure aggregation"]
    assert 0 < secure["secure_aggregation_s"] <= secure["round_s"]
    assert result["vector_length"] == 4 * 64 and math.isfinite(result["flower_secaggplus_round_s"])
    assert "Flower / simulator" in format_flower(result)

"""``pfpl bench``: measurements that drive the public engine (no second backbone factory, no second
training loop). :mod:`.settings` holds the options (no torch import), :mod:`.workload` the timed
workload, :mod:`.engine` the engine-vs-reference comparison, :mod:`.dp` the cost of a DP step,
:mod:`.flops` FLOP counting and the matmul peak."""

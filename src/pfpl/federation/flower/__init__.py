"""pfpl on a Flower federation (DESIGN §7): a SuperLink, SuperNodes that each host some of the
benchmark's clients, and the same client update, privacy mechanisms, accountants and server
aggregation as the in-process simulator, carried over Flower's Message API.

- :mod:`.records`: tensors, node state and secure-aggregation messages as Flower records (no pickle);
- :mod:`.node`: what a SuperNode does for its clients (train, evaluate, its share of secure aggregation);
- :mod:`.driver`: the server side, one method's federation as :func:`pfpl.federation.runner.run` drives it;
- :mod:`.apps`: the ``ClientApp`` and ``ServerApp`` Flower runs;
- :mod:`.launch`: ``pfpl flower run``, a SuperLink and N SuperNodes on loopback for one run.
"""

"""Secure aggregation (SecAgg / SecAgg+, DESIGN §5): the server learns only the sum of the clients'
vectors. :mod:`.primitives` wraps the maintained libraries (X25519, HKDF, AEAD, a ChaCha20 PRG,
Shamir sharing), :mod:`.encoding` the fixed-point ring, :mod:`.graph` SecAgg+'s sparse neighbour
graph, :mod:`.protocol` the client and server state machines and their messages, and
:mod:`.aggregator` the engine's secure aggregator with distributed (Skellam) DP."""

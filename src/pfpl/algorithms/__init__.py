"""Federated prompt-learning methods (DESIGN §1), vectorized over clients."""

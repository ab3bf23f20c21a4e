"""Evaluation of released prompts (torch-free here, so the CLI can name the scores cheaply)."""

#: every accuracy a federated evaluation can report, in the order of the tables
#: (:mod:`pfpl.evaluation.federated` says what each one measures)
SCORES = ("local", "neighbor", "neighbor_same_domain", "cross_domain", "base", "novel", "hm", "held_out_domain")

"""The in-process simulator engine and the run driver (DESIGN §4)."""

"""Settings of tiny runs that several test modules share (imported as ``tiny_runs``: tests/ is on the
path through its conftest)."""

#: a run with vision prompts small enough for a test: 3 clients, one round of 2 steps, one image per
#: class and style in train and val, 2 vision tokens in 2 layers
TINY_VISION_RUN = [
    "federation.n_clients=3",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=4",
    "data.train_per_class_domain=1",
    "data.val_per_class_domain=1",
    "prompt.n_ctx=4",
    "train.rank=2",
    "prompt.vision_tokens=2",
    "prompt.vision_depth=2",
]

"""Optimizers and learning-rate schedules, each its own files as a model family is: a
factory (`adamw.py`, `warmup_cosine.py`, ...) and a schema with its checks beside it
(`adamw_schema.py`, ...; the base schemas and shared checks: `schema.py`), found by
`vitexp.schema.find_schemas`. This module imports no Keras: the command line reads the
schemas without loading TensorFlow.
"""


def ema_arguments(ema_momentum: float | None) -> dict:
    """Keras' optimizer arguments for a weight average with `ema_momentum` (None: none)."""
    return {"use_ema": ema_momentum is not None, "ema_momentum": ema_momentum or 0.99}

"""vitexp: Vision Transformer experiments with Hydra configs, Keras training and MLflow."""

__version__ = "0.1.0"

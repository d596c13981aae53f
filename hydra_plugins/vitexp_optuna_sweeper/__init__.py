"""vitexp's Hydra sweeper: persistent, prunable Optuna studies (`hydra/sweeper=vitexp_optuna`)."""

"""Training: one run's recipe (`run`), its callbacks and checkpoints, devices and precision,
resumption, what a run records, pre-emption, multi-worker and Slurm.
"""

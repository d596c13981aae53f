"""The names of the tags vitexp puts on MLflow runs: written here once, read by name."""

COMMAND = "vitexp.command"  # the command line that started the run
GIT_COMMIT = "vitexp.git_commit"
HYDRA_JOB = "vitexp.hydra_job"
OUTPUT_DIR = "vitexp.output_dir"  # the run's folder: its checkpoints
MODEL = "vitexp.model"
DATA = "vitexp.data"
CONFIG_HASH = "vitexp.config_hash"  # what a run computes, hashed: the same job across sweeps
ERROR = "vitexp.error"  # why a run FAILED, in one line for a user error
PROCESS = "vitexp.process"  # host:pid of the process training the run
SLURM_JOB = "vitexp.slurm_job_id"
SLURM_RESTARTS = "vitexp.slurm_restarts"
STOPPED_EARLY = "vitexp.stopped_early"
REUSED_RUN = "vitexp.reused_run"  # a sweep's job not trained again: the FINISHED run it stands for
EVALUATES = "vitexp.evaluates"  # an evaluation's run: the run it scores
SWEEP = "vitexp.sweep"  # "true" on a sweep's parent run
SWEEP_DIR = "vitexp.sweep_dir"
SUPERSEDED_BY = "vitexp.superseded_by"  # a killed sweep's parent: the parent that went on
PRUNED = "vitexp.pruned"
PRUNED_EPOCH = "vitexp.pruned_epoch"
RETRIED = "vitexp.retried"  # a search's trial a kill cut short, run again
OPTUNA_TRIAL = "vitexp.optuna_trial"
OPTUNA_STUDY = "vitexp.optuna_study"
OPTUNA_STORAGE = "vitexp.optuna_storage"
TTA = "vitexp.tta"  # on a logged model: the test-time views it answers from

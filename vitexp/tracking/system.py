"""MLflow's system-metrics monitor, quiet, and publishing after the run's own first metrics.

MLflow's compare page opens its parallel-coordinates plot on the first metric its runs
share, in the order the store holds them: the first logged. A run's system metrics would
come first wherever an epoch takes longer than the monitor's 10 s interval, so the plot
would open on `system/cpu_utilization_percentage`. This monitor holds its values back until
the run has a metric of its own (the first epoch's, `val_top1` first); the samples taken
meanwhile are averaged into its first published values, or published when it finishes, so
nothing is lost.
"""

import logging

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from vitexp.tracking.store import said_if_slow

# MLflow says at INFO when it starts and stops, and that it skips GPUs on a machine without
LOGGER = "mlflow.system_metrics"


class SystemMonitor(SystemMetricsMonitor):
    """`SystemMetricsMonitor(run_id, resume_logging=, tracking_uri=)` that publishes once the
    run has metrics that are not system metrics; `start()`, then `finish()` at the end."""

    def __init__(self, *args, **kwargs):
        logging.getLogger(LOGGER).setLevel(logging.WARNING)
        super().__init__(*args, **kwargs)
        self._run_has_metrics = False

    def publish_metrics(self, metrics):
        if not self._run_has_metrics:
            from mlflow.tracking import MlflowClient

            logged = MlflowClient(self._tracking_uri).get_run(self._run_id).data.metrics
            self._run_has_metrics = any(not key.startswith(self._metrics_prefix) for key in logged)
            if not self._run_has_metrics:
                return  # the samples stay and are averaged with the next ones
        super().publish_metrics(metrics)

    def finish(self):
        """Stops sampling; what was held back (a run shorter than two intervals, whose metrics
        came after the first sample) is published now, at the run's end. A store that does
        not answer holds this for up to its timeout; after a second the user is told why."""
        with said_if_slow("sending the run's last system metrics", "press Ctrl-C to stop now"):
            self._finish()

    def _finish(self):
        if self._process is not None:
            self._shutdown_event.set()
            self._process.join()
            held = self.aggregate_metrics()
            if held:
                self._run_has_metrics = True
                try:
                    self.publish_metrics(held)
                except Exception:  # a store that is away: MLflow's own sampling drops them too
                    logging.getLogger(LOGGER).debug("system metrics held at the end not sent")
        super().finish()

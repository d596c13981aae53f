"""What a vitexp command leaves out of its imports: scikit-learn, which Keras asks for.

`import keras` imports scikit-learn when it is installed (MLflow requires it) for Keras'
scikit-learn wrappers alone, which vitexp never uses: 1.4 s of the ~7 s that TensorFlow,
Keras and MLflow take to import on two AVX2 cores, paid by every run, every job of a sweep
and every worker. `leave_sklearn_out_of_keras()`, called first by vitexp's commands and jobs,
answers those wrappers' import as if scikit-learn were not installed, a case Keras handles
(its wrappers then say so if used). Everyone else in the process imports scikit-learn as
usual (Optuna's parameter importances do). A user's own process that imports vitexp as a
library keeps Keras whole.
"""

import importlib.abc
import sys

PACKAGE = "sklearn"
ASKED_BY = "keras.src.wrappers"  # the only Keras modules that import it
MACHINERY = ("importlib._bootstrap", "importlib._bootstrap_external", __name__)


class _NotForKerasWrappers(importlib.abc.MetaPathFinder):
    """Refuses scikit-learn to an import statement in Keras' wrappers; finds nothing else."""

    def find_spec(self, name, path=None, target=None):
        if name == PACKAGE and _importer().startswith(ASKED_BY):
            raise ModuleNotFoundError(f"vitexp's commands leave {PACKAGE} out of Keras' wrappers", name=name)
        return None


def _importer() -> str:
    """The module whose import statement is being answered: the first frame outside the
    import machinery."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in MACHINERY:
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


def leave_sklearn_out_of_keras() -> None:
    """For this process, before Keras is imported; once is enough, and later calls do nothing."""
    if not any(isinstance(finder, _NotForKerasWrappers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NotForKerasWrappers())

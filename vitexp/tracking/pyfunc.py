"""vitexp's MLflow Model: a checkpoint behind MLflow's pyfunc interface, with what it needs."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # vitexp/, logged with the model


class VitexpClassifier(mlflow.pyfunc.PythonModel):
    """A vitexp checkpoint behind MLflow's pyfunc interface."""

    def load_context(self, context):
        names = json.loads(Path(context.artifacts["class_names"]).read_text(encoding="utf-8"))
        # models logged before the views were recorded answer from the images as they are
        tta = (context.model_config or {}).get("tta", "none")
        self.load(context.artifacts["checkpoint"], names, tta=tta)

    def load(self, checkpoint, class_names: list[str], model=None, tta: str = "none") -> None:
        """The checkpoint's model (or `model`, already loaded from it), its class names and
        the test-time views it answers from (`trainer.tta`)."""
        from vitexp.models import load_model  # above the wall: loaded where MLflow loads the model

        self.model = model if model is not None else load_model(str(checkpoint))
        self.class_names = list(class_names)
        self.tta = str(tta)

    # an array, as the signature says (uint8 images); MLflow validates no data by the hint
    def predict(self, context, model_input: np.ndarray, params=None):
        from vitexp.data.pipeline import predict_probs  # TensorFlow: where the model answers

        images = np.asarray(model_input, dtype=np.uint8)
        probs = predict_probs(self.model, images, self.tta)
        best = probs.argmax(-1)
        return pd.DataFrame(
            {"class": best, "label": [self.class_names[i] for i in best], "probability": probs.max(-1)}
        )


def requirements(model) -> list[str]:
    """What the logged model needs to load and run: the versions this process has, tfswin
    only for a Swin model (its stale numpy<2 pin conflicts with numpy 2 in a fresh env)."""
    from importlib.metadata import version

    packages = ["tensorflow", "keras", "numpy", "mlflow", "omegaconf"]
    if any(type(layer).__module__.startswith("tfswin") for layer in model._flatten_layers()):
        packages.append("tfswin")
    return [f"{p}=={version(p)}" for p in packages]

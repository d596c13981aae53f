"""Loads the checkpoints `test_precision` saved, in a new process with Keras' default policy.

    python reload_checkpoints.py FOLDER

For each name in FOLDER/names.json: the logits of FOLDER/images.npy (`NAME.reloaded.npy`),
and on stdout, as JSON, what the reloaded model is: its layers' policies, its optimizer and
that optimizer's scalar state, the classes its pyfunc model answers, its attention maps.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np


def optimizer_scalars(optimizer) -> list:
    """`[name, value]` of the optimizer's scalar state: steps, learning rate, loss scale."""
    return [[v.path.split("/")[-1], float(v)] for v in optimizer.variables if len(v.shape) == 0]


def main(folder: Path) -> dict:
    from vitexp.models import load_model
    from vitexp.models.vit import attention_maps, has_attention
    from vitexp.tracking.pyfunc import VitexpClassifier

    images = np.load(folder / "images.npy")
    report = {"global_policy": keras.mixed_precision.global_policy().name}
    for name in json.loads((folder / "names.json").read_text()):
        model = load_model(str(folder / f"{name}.keras"))
        np.save(folder / f"{name}.reloaded.npy", keras.ops.convert_to_numpy(model(images, training=False)))
        served = VitexpClassifier()
        served.load(folder / f"{name}.keras", [f"c{i}" for i in range(7)])
        report[name] = {
            "policies": sorted({layer.dtype_policy.name for layer in model._flatten_layers()}),
            "optimizer": type(model.optimizer).__name__,
            "xla": bool(model.jit_compile),
            "optimizer_scalars": optimizer_scalars(model.optimizer),
            "served": served.predict(None, images)["class"].tolist(),
            "attention_blocks": len(attention_maps(model, images[:1])) if has_attention(model) else 0,
        }
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

"""Whatever precision a model trains in, a new process with Keras' default policy uses it.

Every model family and layer-changing option is trained a step and saved under each policy
here (bfloat16 and float16 are emulated on CPUs without them: tiny models), then one fresh
Python process loads every checkpoint with `vitexp.models.load_model`, as `predict`,
`evaluate`, `explain`, `registry` and the logged MLflow Model do, and hands back its logits.
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from reload_checkpoints import optimizer_scalars
from test_models import small

from vitexp.train.build import compile_model
from vitexp.validate import check_config

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# the precision's own rounding: the reloaded model computes the same ops as the trained one
TOLERANCE = {"float32": 1e-5, "mixed_bfloat16": 3e-2, "mixed_float16": 3e-3}
VARIANTS = {  # a model config and the changes to it (dotted keys)
    "textbook": ("vit", {"model.pooling": "flatten", "model.head_units": [32]}),
    "conv_stem": ("vit_tiny", {"model.tokenizer": "conv"}),
    "hybrid_stem": ("vit_tiny", {"model.tokenizer": "conv", "model.stem_channels": [8, 16, 16]}),
    "spt_lsa": ("vit_tiny", {"model.shifted_patches": True, "model.locality_attention": True}),
    "cls_sincos": ("vit_tiny", {"model.pooling": "cls", "model.pos_embedding": "sincos"}),
    "drop_path": ("vit_tiny", {"model.drop_path": 0.2, "model.dropout": 0.1, "model.attention_dropout": 0.1}),
    "xla": ("vit_tiny", {"trainer.jit_compile": "true"}),  # the reloaded model predicts with XLA too
    "swin": ("swin_micro", {}),
}
# one worker runs the module: its fixture trains every variant once, not once a worker
pytestmark = pytest.mark.xdist_group("precision_reloaded")
IMAGES = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def train_a_step_and_save(variant, precision, folder):
    family, changes = VARIANTS[variant]
    cfg = small(family)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    cfg.model.patch_size = 4
    if family != "swin_micro":
        cfg.model.depth = 1
    check_config(cfg)
    keras.mixed_precision.set_global_policy(precision)
    try:  # built and compiled as a run does it
        model = instantiate(cfg.model, _convert_="all")
        compile_model(model, cfg, total_steps=10)
        model.run_eagerly = True  # one step: no graph to trace
    finally:
        keras.mixed_precision.set_global_policy("float32")
    labels = keras.ops.one_hot(np.arange(4) % 7, 7)
    model.train_on_batch(IMAGES, labels)
    name = f"{variant}-{precision}"
    model.save(folder / f"{name}.keras")
    np.save(folder / f"{name}.trained.npy", keras.ops.convert_to_numpy(model(IMAGES, training=False)))
    (folder / f"{name}.optimizer.json").write_text(json.dumps(optimizer_scalars(model.optimizer)))
    return name


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every variant in every precision, trained and saved here, reloaded in one new process."""
    folder = tmp_path_factory.mktemp("precisions")
    names = [train_a_step_and_save(v, p, folder) for v in VARIANTS for p in PRECISIONS]
    np.save(folder / "images.npy", IMAGES)
    (folder / "names.json").write_text(json.dumps(names))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("reload_checkpoints.py")), str(folder)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_new_process_loads_it_and_gives_the_same_logits(variant, precision, reloaded):
    folder, report = reloaded
    name = f"{variant}-{precision}"
    assert report["global_policy"] == "float32"  # Keras' default: the process set nothing
    trained = np.load(folder / f"{name}.trained.npy")
    again = np.load(folder / f"{name}.reloaded.npy")
    assert again.dtype == np.float32 and np.isfinite(again).all()
    np.testing.assert_allclose(again, trained, atol=TOLERANCE[precision], rtol=TOLERANCE[precision])
    loaded = report[name]
    assert precision in loaded["policies"]  # the layers compute as they trained
    # the optimizer state came back: its step, and for float16 the loss scale and its counter
    assert loaded["optimizer_scalars"] == json.loads((folder / f"{name}.optimizer.json").read_text())
    if precision == "mixed_float16":  # a step whose gradients overflow halves the scale instead
        assert loaded["optimizer"] == "LossScaleOptimizer"
        assert "dynamic_scale" in dict(loaded["optimizer_scalars"])
    else:
        assert ["iteration", 1.0] in loaded["optimizer_scalars"]
    # the pyfunc model answers as trained: its class is the trained top one, or within the
    # precision's tolerance of it (an untrained model's logits can nearly tie in bfloat16)
    served = trained[np.arange(len(trained)), loaded["served"]]
    top = trained.max(-1)
    assert np.all(top - served <= 2 * TOLERANCE[precision] * (1 + np.abs(top))), (loaded["served"], trained)
    assert loaded["xla"] == (variant == "xla")
    if variant != "swin":
        assert loaded["attention_blocks"] == 1  # explain's attention maps

"""Every model file under conf/model builds, runs forward and trains a step (at small width)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CONF, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitexp.models import load_model
from vitexp.models.schema import family_schemas
from vitexp.models.swin import resolve_weights
from vitexp.validate import ConfigError, check_config

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def eager_step(model, optimizer, images, labels):
    """One training step run eagerly: no graph trace, so even Swin-L takes seconds."""
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_weights), model.trainable_weights))
    return float(loss)


def small(name):
    """The model's own config on 32x32 synthetic data; Swin widths cut to 8 per head."""
    overrides = [f"model={name}", "data=synthetic", "data.image_shape=[32,32,3]", "data.num_classes=7"]
    cfg = compose(overrides)
    if OmegaConf.get_type(cfg.model) is family_schemas()["swin_schema"]:
        cfg.model.embed_dim = 8 * cfg.model.num_heads[0]
    check_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def built():
    """`built(name, **changes)`: the model of `small(name)` with `changes` to its keys, built
    once per distinct config in this module (a Swin build takes seconds)."""
    models = {}

    def build(name, **changes):
        cfg = small(name)
        for key, value in changes.items():
            cfg.model[key] = value
        check_config(cfg)
        layout = OmegaConf.to_yaml(cfg.model, resolve=True)
        if layout not in models:
            models[layout] = instantiate(cfg.model, _convert_="all")
        return models[layout]

    return build


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_and_trains_a_step(name, built):
    model = built(name)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = keras.ops.one_hot(np.array([0, 1, 2, 6]), 7)
    logits = model(images)
    assert logits.shape == (4, 7) and logits.dtype == "float32"
    before = [np.array(w) for w in model.trainable_weights]
    assert np.isfinite(eager_step(model, keras.optimizers.AdamW(1e-3), images, labels))
    changed = sum(not np.array_equal(a, np.array(b)) for a, b in zip(before, model.trainable_weights))
    assert changed > len(before) // 2


def test_swin_checkpoint_round_trip_and_training_continues(tmp_path, built):
    model = built("swin_micro")  # trained a step or not, a checkpoint must give it back
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = keras.ops.one_hot(np.array([0, 1, 2, 3]), 7)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    eager_step(model, model.optimizer, images, labels)
    model.save(tmp_path / "swin.keras")
    again = load_model(str(tmp_path / "swin.keras"))
    np.testing.assert_array_equal(model(images), again(images))
    assert int(again.optimizer.iterations) == 1
    eager_step(again, again.optimizer, images, labels)
    assert int(again.optimizer.iterations) == 2


def test_imagenet_weights_offline_fail_fast_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(
        "vitexp.models.swin.WEIGHT_URLS",
        {"swin_tiny_224": "http://127.0.0.1:9/swin_tiny_patch4_window7_224_22k.h5"},
    )
    with pytest.raises(ConfigError) as err:
        resolve_weights("imagenet", "swin_tiny_224", timeout=2)
    message = str(err.value)
    assert "swin_tiny_patch4_window7_224_22k.h5" in message and str(tmp_path / "tfswin") in message
    assert "\n" not in message


def test_local_weights_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.h5"), "swin_tiny_224")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=swin", "model.image_size=16"], "at least 32 pixels"),
        (["model=swin", "patch_size=3"], "not divisible by patch_size=3"),
        (["model=swin", "model.image_size=48"], "divisible by 8"),
        (["model=swin", "model.weights=imagenet", "depth=4"], "pretrained layout"),
    ],
)
def test_swin_rejects_what_it_cannot_take(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose(overrides))


VIT_OPTIONS = [
    {"pooling": "flatten"},
    {"pooling": "cls"},
    {"pooling": "gap"},
    {"pos_embedding": "learned"},
    {"pos_embedding": "sincos"},
    {"shifted_patches": True},
    {"locality_attention": True},
    {"tokenizer": "conv"},
    {"tokenizer": "conv", "patch_size": 4, "stem_channels": [8, 16, 16]},
    {"drop_path": 0.2},
    {"head_units": [64, 32]},
    {"head_dim": 8},
]


@pytest.mark.parametrize("option", VIT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_each_vit_design_choice_builds_and_trains(option, built):
    model = built("vit_tiny", **option)  # vit_tiny's own choices share its model
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = keras.ops.one_hot(np.array([0, 1, 2, 6]), 7)
    assert np.isfinite(eager_step(model, keras.optimizers.AdamW(1e-3), images, labels))


def test_swin_trains_on_numpy_2(built):
    """tfswin declares numpy<2 and is installed without its pins (Makefile): it runs on numpy 2."""
    from importlib.metadata import requires

    assert int(np.__version__.split(".")[0]) >= 2
    assert any(r.replace(" ", "").startswith("numpy<2") for r in requires("tfswin"))  # the stale pin
    model = built("swin_micro")
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = keras.ops.one_hot(np.array([0, 1, 2, 6]), 7)
    assert np.isfinite(eager_step(model, keras.optimizers.AdamW(1e-3), images, labels))

"""Every preset under conf/experiment composes, checks, and trains one step on synthetic data."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CONF, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitexp.data.augment import build_augment
from vitexp.models.swin_schema import SwinConfig
from vitexp.validate import check_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_every_experiment_opens_with_command_result_and_runtime():
    for name in EXPERIMENTS:
        header = (CONF / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]
        assert f"experiment={name}" in header, name
        assert "Expected" in header and "Runtime" in header, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_step(name):
    cfg = compose([f"experiment={name}"])
    check_config(cfg)  # the preset as a user runs it
    model_cfg = cfg.model.copy()
    if OmegaConf.get_type(model_cfg) is SwinConfig:
        model_cfg.weights = None  # the test machine is offline
        model_cfg.embed_dim = 8 * model_cfg.num_heads[0]
    model = instantiate(model_cfg, _convert_="all")
    schedule = instantiate(cfg.schedule)(peak_lr=cfg.optimizer.learning_rate, total_steps=100)
    optimizer = instantiate(cfg.optimizer)(learning_rate=schedule)
    h, w, c = cfg.data.image_shape
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (4, h, w, c)), tf.uint8)
    labels = tf.one_hot([0, 1, 2, 3], cfg.data.num_classes)
    augment = build_augment(cfg.data.augment)
    if augment is not None:
        images, labels = augment(images, labels, tf.constant([1, 2], tf.int64))
    loss_fn = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=cfg.trainer.label_smoothing
    )
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_weights), model.trainable_weights))
    assert np.isfinite(float(loss)) and int(optimizer.iterations) == 1

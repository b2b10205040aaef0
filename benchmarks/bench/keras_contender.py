"""Contender (d): the lecture's Keras network on the torch backend, trained by ``model.fit``
(needs ``pip install -e '.[bench]'``)."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

from deepopt.data import NUM_CLASSES, Split, normalize

from .data import EpochDone, Outcome, Runner, Setup


def keras_available() -> bool:
    return importlib.util.find_spec("keras") is not None


def keras_runner(setup: Setup, out: Outcome) -> Runner:
    """The lecture's Keras ``build_nn`` on the torch backend, trained by ``model.fit``."""

    def run(epochs: int, epoch_done: EpochDone) -> None:
        os.environ["KERAS_BACKEND"] = "torch"
        import keras  # type: ignore[import-untyped]

        cfg, prepared = setup.config.model, setup.data.prepared
        assert cfg.name == "lecture_cnn" and setup.config.optim.momentum is not None
        keras.utils.set_random_seed(setup.config.seed)
        layers: list[Any] = [keras.Input((28, 28, 1))]  # Keras' default: channels last
        for channels, stride in zip(cfg.conv_channels, (2, 2, 1), strict=True):
            layers.append(
                keras.layers.Conv2D(
                    channels, 5, strides=stride, padding="same", use_bias=not cfg.batchnorm
                )
            )
            if cfg.batchnorm:
                layers.append(keras.layers.BatchNormalization())
            layers.append(keras.layers.Activation(cfg.activation))
        layers += [keras.layers.Flatten(), keras.layers.Dense(cfg.dense_units, use_bias=False)]
        if cfg.batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers += [keras.layers.Activation(cfg.activation), keras.layers.Dense(NUM_CLASSES)]
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=setup.config.optim.lr,
                momentum=setup.config.optim.momentum,
                nesterov=True,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

        def nhwc(split: Split) -> Any:
            return normalize(split.images, prepared.mean, prepared.std).permute(0, 2, 3, 1).numpy()

        class Pause(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                out.extra["val_acc"] = float((logs or {}).get("val_accuracy", math.nan))
                epoch_done()

        model.fit(
            nhwc(prepared.train),
            prepared.train.labels.numpy(),
            batch_size=setup.batch_size,
            epochs=epochs,
            validation_data=(nhwc(prepared.val), prepared.val.labels.numpy()),
            shuffle=True,
            verbose=2,  # one line per epoch, as deepopt's progress
            callbacks=[Pause()],
        )

    return run

"""Training: fitting a model on image splits (`fit`), and the head on cached features (`train_top`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import numpy as np

from classifier import config
from classifier.model import heads
from classifier.model.history import early_stopping
from classifier.model.images import Split, dataset


def fit(
    model: keras.Model,
    train: Split,
    validation: Split,
    image_size: tuple[int, int],
    batch_size: int,
    epochs: int,
    seed: int,
    callbacks: list[keras.callbacks.Callback],
) -> dict[str, list[float]]:
    """Train `model` on the train split's images, shuffled with `seed`, validated on the validation
    split each epoch; return its per-epoch history."""
    history = model.fit(
        dataset(train, image_size, batch_size, shuffle=True, seed=seed),
        validation_data=dataset(validation, image_size, batch_size),
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself, with the seed
        callbacks=callbacks,
        verbose=2,
    )
    return history.history


log = logging.getLogger(__name__)


def optimizer(params: config.TopParams) -> keras.optimizers.Optimizer:
    if params.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=params.learning_rate)
    if params.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=params.learning_rate)
    return keras.optimizers.SGD(learning_rate=params.learning_rate, momentum=0.9)


def train_top(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    params: config.TopParams,
    seed: int,
    pool: str,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fit the head (`pool`: see `heads.head_pool`) on (features, labels); return it and its
    per-epoch history."""
    keras.utils.set_random_seed(seed)
    head = heads.build_head(train[0].shape[1:], num_classes, params, pool)
    head.compile(optimizer=optimizer(params), loss=heads.head_loss(num_classes), metrics=["accuracy"])
    history = head.fit(
        train[0],
        train[1],
        validation_data=validation,
        epochs=params.epochs,
        batch_size=params.batch_size,
        shuffle=True,
        callbacks=[*callbacks, *early_stopping(params.patience)],
        verbose=2,
    )
    return head, history.history

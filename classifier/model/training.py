"""Training: fitting a model on image splits (`fit`), and the head on cached features (`train_top`)
and its scores on them (`score_head`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from classifier import config
from classifier.metrics import scores
from classifier.model import backend, devices, eta, heads
from classifier.model.history import early_stopping
from classifier.model.images import Split, dataset

log = logging.getLogger(__name__)


def fit(
    name: str,
    build: Callable[[], keras.Model],
    strategy: Any,
    policy: str,
    train: Split,
    validation: Split,
    image_size: tuple[int, int],
    batch_size: int,
    epochs: int,
    seed: int,
    patience: int | None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build (`build`: a compiled model) and train a model on the train split's images, shuffled with
    `seed`, validated on the validation split each epoch, in the dtype `policy` and under `strategy`
    (`devices.strategy`), with an ETA named `name` and early stopping after `patience` epochs;
    return it and its per-epoch history."""
    devices.set_policy(policy)
    try:
        with strategy.scope():
            model = build()
            time_left = eta.TimeLeft(name, epochs, len(train), batch_size, devices.device_name(), policy)
            history = model.fit(
                dataset(train, image_size, batch_size, shuffle=True, seed=seed),
                validation_data=dataset(validation, image_size, batch_size),
                epochs=epochs,
                shuffle=False,  # the dataset shuffles itself, with the seed
                callbacks=[time_left, *callbacks, *early_stopping(patience)],
                verbose=2,
            )
    finally:
        devices.set_policy("float32")
    cluster = backend.cluster()
    if cluster.several:  # every process must end with the same weights: each says which it has
        digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
        log.info("process %d of %d: weights sha256 %s", cluster.index, cluster.count, digest[:16])
    return model, history.history


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
    heads.compile_classifier(head, optimizer(params), num_classes)
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


def score_head(
    head: keras.Model, test: tuple[np.ndarray, np.ndarray], classes: list[str], threshold: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """(class probabilities, `scores.compute_metrics`) of a head on cached (features, labels): the
    test scores of the frozen-backbone model and of the ensemble, without a backbone pass."""
    probs = scores.as_class_probabilities(head.predict(test[0], verbose=0))
    return probs, scores.compute_metrics(test[1], probs, classes, threshold)

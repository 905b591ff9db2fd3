"""The typical batch approach, as a peer: a plain Keras DeepFM over ``Hashing`` embeddings,
retrained once per simulated day.

Every fid of an example goes through one ``keras.layers.Hashing(num_bins)`` (a fixed hashed
space shared by all slots, the usual way to bound an embedding table without a vocabulary)
into one ``Embedding(num_bins, 1 + dim)``; the slots are sum-pooled and fed to the same
DeepFM as ours (first-order weights, FM term, MLP 64-32 over the embeddings and the dense
inputs). Day by day, in event time: the model *as trained up to the previous day* scores
the day's examples (serving a daily model), then trains one epoch on them (shuffled, batch
256, Adam 1e-3), warm-started from yesterday's weights. So every example is scored before
the model learns from it, as in our progressive validation, but the model is refreshed once
a day instead of continuously.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.experiments import common

NUM_BINS = 1 << 20
DIM = 8
HIDDEN = (64, 32)


def example_arrays(examples: list, config) -> dict:
    """Padded fids ``[n, slots, max list length]`` (-1 = none), dense, labels, times."""
    n = len(examples)
    slot_ids = [s.slot for s in config.slots]
    position = np.full(1 << 15, -1, dtype=np.int64)
    position[slot_ids] = np.arange(len(slot_ids))
    lengths = np.fromiter((len(e["fids"]) for e in examples), dtype=np.int64, count=n)
    fids = np.fromiter((f for e in examples for f in e["fids"]), dtype=np.int64,
                       count=int(lengths.sum()))
    example = np.repeat(np.arange(n), lengths)
    slot_pos = position[fids >> 48]
    kept = slot_pos >= 0
    fids, example, slot_pos = fids[kept], example[kept], slot_pos[kept]
    order = np.lexsort((slot_pos, example))
    fids, example, slot_pos = fids[order], example[order], slot_pos[order]
    group = example * len(slot_ids) + slot_pos
    starts = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    rank = np.arange(group.size) - np.repeat(starts, np.diff(np.r_[starts, group.size]))
    width = int(min(rank.max() + 1 if rank.size else 1, config.max_list_length))
    keep = rank < width
    ids = np.full((n, len(slot_ids), width), -1, dtype=np.int64)
    ids[example[keep], slot_pos[keep], rank[keep]] = fids[keep]
    dense_dim = len(config.dense)
    dense = np.zeros((n, dense_dim), dtype=np.float32)
    if dense_dim:
        dense[:] = [e.get("dense") or [0.0] * dense_dim for e in examples]
    return {"ids": ids, "dense": dense,
            "labels": np.fromiter((e["label"] for e in examples), np.float32, count=n),
            "ts_ms": np.fromiter((e["ts_ms"] for e in examples), np.int64, count=n)}


def build_model(num_slots: int, width: int, dense_dim: int, num_bins: int, seed: int):
    import keras
    from keras import layers, ops
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(num_slots, width), dtype="int64", name="fids")
    dense = keras.Input(shape=(dense_dim,), dtype="float32", name="dense_inputs")
    bins = layers.Hashing(num_bins=num_bins, mask_value=-1, name="hashing")(ids)
    rows = layers.Embedding(num_bins, 1 + DIM, name="embedding",
                            embeddings_initializer=keras.initializers.RandomUniform(
                                -0.01, 0.01))(bins)
    present = ops.expand_dims(ops.cast(ops.not_equal(ids, -1), "float32"), -1)
    pooled = ops.sum(rows * present, axis=2)                      # [n, slots, 1 + dim]
    w, v = pooled[..., 0], pooled[..., 1:]
    first = ops.sum(w, axis=1)
    summed = ops.sum(v, axis=1)
    fm = 0.5 * (ops.sum(summed * summed, axis=1) - ops.sum(v * v, axis=(1, 2)))
    hidden = layers.Concatenate()([layers.Flatten()(v), dense])
    for size in HIDDEN:
        hidden = layers.Dense(size, activation="relu")(hidden)
    deep = ops.squeeze(layers.Dense(1)(hidden), -1)
    linear = ops.squeeze(layers.Dense(1)(dense), -1) if dense_dim else 0.0
    return keras.Model([ids, dense], first + fm + deep + linear)


def hashed_collision_rate(fids: np.ndarray, num_bins: int) -> float:
    """Share of the distinct fids whose ``Hashing`` bin holds another of them."""
    import keras
    unique = np.unique(fids[fids >= 0])
    if unique.size == 0:
        return 0.0
    bins = np.asarray(keras.layers.Hashing(num_bins=num_bins, mask_value=-1)(unique))
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def run(files: list, config_name: str, *, seed: int = 0, num_bins: int = NUM_BINS,
        batch_size: int = 256, learning_rate: float = 1e-3, day_ms: int = common.DAY_MS) -> dict:
    """Scores of every example, each by the model trained on the days before its own."""
    import keras
    import tensorflow as tf

    from schemas.feature_config import load_feature_config
    from transforms.metrics_math import auc
    config = load_feature_config(config_name)
    data = example_arrays(common.read_examples(files), config)
    n, num_slots, width = data["ids"].shape
    model = build_model(num_slots, width, data["dense"].shape[1], num_bins, seed)
    optimizer = keras.optimizers.Adam(learning_rate)

    @tf.function(reduce_retracing=True)
    def train_step(ids, dense, labels):
        with tf.GradientTape() as tape:
            logits = model([ids, dense], training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply(grads, model.trainable_weights)
        return loss

    @tf.function(reduce_retracing=True)
    def predict(ids, dense):
        return tf.sigmoid(model([ids, dense], training=False))

    rng = np.random.default_rng(seed)
    days = data["ts_ms"] // day_ms
    bounds = np.r_[0, np.flatnonzero(np.diff(days)) + 1, n]
    scores = np.empty(n, dtype=np.float64)
    start = time.monotonic()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ids, dense, labels = data["ids"][lo:hi], data["dense"][lo:hi], data["labels"][lo:hi]
        for a in range(0, hi - lo, 8192):
            scores[lo + a:lo + min(a + 8192, hi - lo)] = predict(
                ids[a:a + 8192], dense[a:a + 8192]).numpy()
        order = rng.permutation(hi - lo)
        for a in range(0, hi - lo, batch_size):
            sel = order[a:a + batch_size]
            train_step(ids[sel], dense[sel], labels[sel])
    seconds = time.monotonic() - start
    return {"online_auc": common.rounded(auc(scores, data["labels"])), "examples": int(n),
            "examples_per_s": round(n / seconds, 1), "days": int(len(bounds) - 1),
            "num_bins": num_bins, "collision_rate": round(
                hashed_collision_rate(data["ids"].reshape(-1), num_bins), 5),
            "seconds": round(seconds, 1), "scores": scores, "labels": data["labels"],
            "ts_ms": data["ts_ms"]}

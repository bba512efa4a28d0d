"""Sampling sharded like training: a batch split over 8 devices gives the samples of one device for the same seed
(JAX's partitionable threefry draws the same numbers however the batch is split)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmdiff_jax import objective, sample, train
from mmdiff_jax.configs import tiny


@pytest.fixture(scope="module")
def generators():
    config = tiny.get_config()
    config.sample.batch_size = 16  # 20 samples: a full batch and a padded one
    diff = objective.build_diffusion(config)
    graphdef, params = train.create_model(config, diff)
    return [sample.Generator(config=config, diff=diff, graphdef=graphdef, params=params, step=0, devices=devices)
            for devices in (jax.devices()[:1], jax.devices()[:8])]


def test_the_batch_is_split_over_the_devices(generators):
    one, eight = generators
    assert one.mesh.size == 1 and eight.mesh.size == 8
    leaves = jax.tree.leaves(eight._mesh_params)
    assert all(len(x.sharding.device_set) == 8 and x.sharding.is_fully_replicated for x in leaves)
    rows = sample.parallel.batch_sharding(eight.mesh).addressable_devices_indices_map((16,))
    assert sorted(r[0].start for r in rows.values()) == list(range(0, 16, 2))  # two rows per device


def test_sharded_sampling_equals_one_device(generators):
    one, eight = generators
    key = jax.random.key(5)
    labels = np.arange(20, dtype=np.int32) % 10
    for kwargs in ({}, {"given": {"label": labels}}):
        a, b = one.generate(key, 20, **kwargs), eight.generate(key, 20, **kwargs)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].shape == b[name].shape == ((20, 8, 8, 1) if name == "image" else (20,))
            np.testing.assert_allclose(a[name], b[name], atol=2e-5, err_msg=f"{kwargs}: {name}")

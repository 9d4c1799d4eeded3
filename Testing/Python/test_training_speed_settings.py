"""CPU speed settings of training: bf16 and channels-last choices, and batches drawn ahead on a thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedSegSuiteLib import networks
from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.training.data import Augment, SliceStore
from MedSegSuiteLib.training.jobs import _flag, _speed_settings
from MedSegSuiteLib.training.prefetch import BatchPrefetcher
from MedSegSuiteLib.training.recipes.base import SupervisedRecipe, TrainingData
from MedSegSuiteLib.volume import Volume


@pytest.mark.parametrize(("value", "expected"), [(True, True), (0, False), ("false", False), ("Yes", True)])
def test_recipe_flags_read_as_booleans(value, expected):
    assert _flag(value, "cpu_bf16") is expected


def test_a_recipe_flag_that_is_not_a_boolean_is_refused():
    with pytest.raises(InputError, match="cpu_bf16= takes true or false"):
        _flag("maybe", "cpu_bf16")


def _recipe(name: str, **config) -> SupervisedRecipe:
    network = networks.create(name, "lite", **config)
    return SupervisedRecipe(network, lambda n, x, y: (n(x).mean(), {}), iterations=2)


def test_channels_last_only_for_2d_networks_without_group_norm_and_bf16_only_when_asked():
    banet = _recipe("banet", in_channels=3, num_classes=2)
    assert _speed_settings(banet, {"cpu_bf16": True}, 2) == {"cpu_bf16": True, "channels_last": True}
    assert banet.cpu_bf16
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in banet.network.parameters()
    )
    segmentor = _recipe("hidiff_segmentor", in_channels=3, num_classes=1)  # GroupNorm: stays contiguous
    assert _speed_settings(segmentor, {}, 2) == {"cpu_bf16": False, "channels_last": False}
    off = _recipe("banet", in_channels=3, num_classes=2)
    assert _speed_settings(off, {"channels_last": "false"}, 2)["channels_last"] is False


def _store() -> SliceStore:
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        image = rng.integers(0, 255, (3, 1, 40, 50), dtype=np.uint8)
        label = (rng.random((1, 40, 50)) > 0.7).astype(np.uint8)
        items.append((f"c{i}", Volume(image), Volume(label)))
    return SliceStore(items, [1], 3, {"kind": "scale", "divisor": 255}, (32, 32))


def test_prefetched_batches_are_exactly_the_batches_drawn_on_the_training_thread():
    augment = Augment(flip=0.5, rotate=20, scale=(0.8, 1.2), colour=0.2, specular=0.5)
    data = TrainingData(_store(), 4, augment)
    seed = lambda iteration: 7 * iteration + 1  # noqa: E731
    prefetcher = BatchPrefetcher(data, seed)
    try:
        for iteration in (0, 1, 2, 5):  # 5: a jump (a resume) draws on the spot
            generator, prefetched = prefetcher.get(iteration)
            first = prefetched.labelled_batch(generator)
            second = prefetched.labelled_batch(generator)  # later draws continue the same generator
            reference = torch.Generator().manual_seed(seed(iteration))
            expected_first = data.labelled_batch(reference)
            expected_second = data.labelled_batch(reference)
            for got, want in ((first, expected_first), (second, expected_second)):
                torch.testing.assert_close(got[0], want[0])
                torch.testing.assert_close(got[1], want[1])
    finally:
        prefetcher.close()


def test_specular_glints_brighten_photos_without_touching_labels():
    store = _store()
    generator = torch.Generator().manual_seed(3)
    plain = store.sample(torch.Generator().manual_seed(3), 4, Augment(flip=0.0))
    glinted = store.sample(generator, 4, Augment(flip=0.0, specular=1.0))
    assert torch.equal(plain[1], glinted[1])
    assert bool((glinted[0] >= plain[0] - 1e-6).all()) and float((glinted[0] - plain[0]).max()) > 0.2

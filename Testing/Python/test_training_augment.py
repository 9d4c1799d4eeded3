"""Training augmentation: which axes may mirror, and recipe options that change the augmentation."""

from __future__ import annotations

import pytest
import torch

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.training.data import Augment, augment_2d, augment_3d, changed_augment


def _still(**changes) -> Augment:
    """Augmentation that only mirrors (always, where allowed)."""
    return Augment(flip=1.0, rot90=False, intensity=0.0, **changes)


def test_left_right_flips_only_mirror_the_x_axis_of_a_volume():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    labels = (image[:, 0] % 3).long()
    out_image, out_labels = augment_3d(image.clone(), labels.clone(), _still(flip_axes="x"), torch.Generator())
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_labels, labels.flip(-1))
    every, _ = augment_3d(image.clone(), labels.clone(), _still(), torch.Generator())
    assert torch.equal(every, image.flip(-1).flip(-2).flip(-3))


def test_a_photo_ignores_z_and_flips_only_the_named_axes():
    image = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    labels = (image[:, 0] % 2).long()
    out, out_labels = augment_2d(image.clone(), labels.clone(), _still(flip_axes="yz"), torch.Generator())
    assert torch.equal(out, image.flip(-2)) and torch.equal(out_labels, labels.flip(-2))


def test_recipe_options_change_named_augmentation_settings_and_refuse_others():
    base = Augment(flip=0.5, rotate=20)
    changed = changed_augment(base, {"flip_axes": "x", "scale": [0.9, 1.1]})
    assert changed.flip_axes == "x" and changed.scale == (0.9, 1.1) and changed.rotate == 20
    assert changed_augment(base, None) is base
    with pytest.raises(InputError, match="augmentation settings among"):
        changed_augment(base, {"tilt": 3})
    with pytest.raises(InputError, match="flip_axes takes some of x, y and z"):
        changed_augment(base, {"flip_axes": "lr"})

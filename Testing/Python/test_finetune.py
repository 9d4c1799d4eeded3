"""Semi-supervised finetuning: a wrong parent gets better, unlabelled data is used, nothing is overwritten."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import sphere_volume

from MedSegSuiteLib.cli import main
from MedSegSuiteLib.errors import Cancelled, InputError
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.models import ModelRegistry, load_card
from MedSegSuiteLib.models.weights import sha256_file
from MedSegSuiteLib.training.data import Augment, PatchStore
from MedSegSuiteLib.training.finetune import FinetuneOptions, finetune_model
from MedSegSuiteLib.training.recipes.base import TrainingData
from MedSegSuiteLib.training.recipes.mean_teacher import MeanTeacherRecipe
from MedSegSuiteLib.volume import Volume


def _dark_ball(seed: int):
    """A faint ball (the structure to find) beside a bright one (not labelled): the parent marks the wrong one."""
    rng = np.random.default_rng(seed)
    faint_centre = (rng.uniform(10, 24), rng.uniform(10, 16), rng.uniform(12, 24))
    bright_centre = (rng.uniform(10, 24), rng.uniform(26, 30), rng.uniform(12, 24))
    faint, mask = sphere_volume((34, 40, 36), faint_centre, 5.5, seed=seed)
    bright, _ = sphere_volume((34, 40, 36), bright_centre, 5.5, seed=seed + 1000)
    image = 100.0 + (faint - 100.0) * 0.5 + (bright - 100.0) * 0.5 + 40.0 * (bright > 150)
    return image.astype(np.float32), mask


@pytest.fixture(scope="module")
def dark_balls(tmp_path_factory):
    root = tmp_path_factory.mktemp("dark")
    for sub in ("labelled/images", "labelled/labels", "unlabelled"):
        (root / sub).mkdir(parents=True)
    for i in range(5):
        image, mask = _dark_ball(i)
        write_image(Volume(image), root / "labelled" / "images" / f"l{i}.nii.gz")
        write_image(Volume(mask), root / "labelled" / "labels" / f"l{i}.nii.gz")
    for i in range(4):
        write_image(Volume(_dark_ball(100 + i)[0]), root / "unlabelled" / f"u{i}.nii.gz")
    return root


def test_finetuning_fixes_a_wrong_parent_and_registers_a_new_model(home, unet3d_dir, dark_balls):
    registry = ModelRegistry()
    registry.import_model(unet3d_dir)
    parent_sha = sha256_file(registry.get("test-unet3d").weights_path)
    logs = []
    entry = finetune_model(
        FinetuneOptions(
            parent="test-unet3d",
            labelled=dark_balls / "labelled",
            unlabelled=dark_balls / "unlabelled",
            iterations=100,
            batch_size=2,
            lr=3e-3,
            device="cpu",
            held_out=1,
        ),
        on_log=logs.append,
    )
    assert entry.card.id == "test-unet3d-ft-1" and entry.card.parent == "test-unet3d" and entry.source == "user"
    metrics = {m["name"]: m["value"] for m in entry.card.metrics}
    assert metrics["dice_before_finetuning"] < 0.6, "the parent should be clearly wrong (it marks both balls)"
    assert metrics["dice"] > metrics["dice_before_finetuning"] + 0.2, metrics
    finetune = entry.card.training["finetune"]
    assert finetune["labelled"] == 5 and finetune["unlabelled"] == 4 and len(finetune["held_out"]) == 1
    assert "held-out: 1 of the 5 labelled cases" in entry.card.metrics[0]["split"]
    assert any(log.get("consistency", 0) > 0 for log in logs), "the unlabelled term must be non-zero"
    assert sha256_file(registry.get("test-unet3d").weights_path) == parent_sha, "the parent must not change"
    assert [e.card.id for e in registry.entries()] == ["test-unet3d", "test-unet3d-ft-1"]
    assert (entry.directory / "training_log.json").is_file()
    verdict = finetune["verdict"]
    assert verdict["outcome"] == "better" and verdict["selected"] and verdict["held_back"] == 1
    assert verdict["dice_before"] == metrics["dice_before_finetuning"] and verdict["dice_after"] == metrics["dice"]
    assert logs[0] == {
        "iteration": 0,
        "val_dice": pytest.approx(metrics["dice_before_finetuning"], abs=1e-4),
        "val_hd95": logs[0]["val_hd95"],
    }  # the parent is checkpoint 0


def test_unlabelled_consistency_alone_changes_the_weights(unet3d_dir, dark_balls):
    from MedSegSuiteLib.models import load_model
    from MedSegSuiteLib.training.datasets import discover_cases, load_case

    model = load_model(unet3d_dir)
    items = [(c.id, *load_case(c)) for c in discover_cases(dark_balls / "labelled")][:2]
    unlabelled = [(c.id, load_case(c)[0], None) for c in discover_cases(dark_balls / "unlabelled", False)]
    norm = model.card.input.normalization
    data = TrainingData(
        PatchStore(items, [1], 1, norm),
        1,
        Augment(),
        unlabelled=PatchStore(unlabelled, [1], 1, norm),
        patch_zyx=(16, 32, 32),
    )

    def no_supervision(network, images, classes):
        return network(images).sum() * 0.0, {}

    recipe = MeanTeacherRecipe(model.network, 10, no_supervision, lr=1e-2, rampup=0.0, noise=0.3)
    before = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    parts = recipe.step(data, torch.Generator().manual_seed(0), 0)
    assert parts["consistency"] > 0 and parts["consistency_weight"] == 1.0
    changed = [
        k for k, v in recipe.student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert changed, "the consistency term alone must move the student's weights"


def test_the_mean_teacher_keeps_the_parents_batchnorm_statistics_unless_told_not_to(dark_balls):
    from MedSegSuiteLib.training.datasets import discover_cases, load_case

    items = [(c.id, *load_case(c)) for c in discover_cases(dark_balls / "labelled")][:2]
    unlabelled = [(c.id, load_case(c)[0], None) for c in discover_cases(dark_balls / "unlabelled", False)][:2]
    norm = {"kind": "zscore"}
    data = TrainingData(
        PatchStore(items, [1], 1, norm),
        2,
        Augment(),
        unlabelled=PatchStore(unlabelled, [1], 1, norm),
        patch_zyx=(8, 16, 16),
    )

    def network():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)
        )
        net[1].running_mean.fill_(0.25)
        net[1].running_var.fill_(2.0)
        return net

    frozen = MeanTeacherRecipe(network(), 5, lr=1e-2, rampup=0.0, amp=False)
    weight = frozen.student[1].weight.detach().clone()
    for iteration in range(3):
        frozen.step(data, torch.Generator().manual_seed(iteration), iteration)
    for net in (frozen.student, frozen.network):  # student and teacher keep the parent's statistics
        assert torch.equal(net[1].running_mean, torch.full((4,), 0.25))
        assert torch.equal(net[1].running_var, torch.full((4,), 2.0))
        assert net[1].num_batches_tracked.item() == 0
    assert not torch.equal(frozen.student[1].weight, weight), "the BatchNorm scale still learns"
    assert frozen.describe()["frozen_norm"] is True

    free = MeanTeacherRecipe(network(), 5, lr=1e-2, rampup=0.0, amp=False, frozen_norm=False)
    free.step(data, torch.Generator().manual_seed(0), 0)
    assert not torch.equal(free.student[1].running_mean, torch.full((4,), 0.25))
    assert torch.equal(free.network[1].running_mean, free.student[1].running_mean)


def test_labels_the_parent_does_not_know_are_refused_before_training(home, unet3d_dir, dark_balls, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, mask = _dark_ball(7)
    write_image(Volume(image), tmp_path / "images" / "a.nii.gz")
    write_image(Volume(mask * 3), tmp_path / "labels" / "a.nii.gz")
    with pytest.raises(InputError, match=r"label value\(s\) 3 match no label of the model"):
        finetune_model(FinetuneOptions(parent=str(unet3d_dir), labelled=tmp_path, iterations=2, device="cpu"))
    shifted = Volume(mask, (1, 1, 1), (5, 0, 0))
    write_image(shifted, tmp_path / "labels" / "a.nii.gz", overwrite=True)
    with pytest.raises(InputError, match="geometry differs|grid"):
        finetune_model(FinetuneOptions(parent=str(unet3d_dir), labelled=tmp_path, iterations=2, device="cpu"))
    assert not any((home / "models").glob("*")) if (home / "models").exists() else True


def test_cancel_keeps_a_checkpoint_and_cli_resume_finishes(home, unet3d_dir, dark_balls, capsys):
    ModelRegistry().import_model(unet3d_dir)
    cancel = threading.Event()

    def progress(done, total, stage):
        if stage == "training" and done >= 5:
            cancel.set()

    with pytest.raises(Cancelled):
        finetune_model(
            FinetuneOptions(
                parent="test-unet3d", labelled=dark_balls / "labelled", iterations=20, batch_size=1, device="cpu"
            ),
            progress=progress,
            cancel=cancel,
        )
    assert (home / "models" / "test-unet3d-ft-1.training" / "checkpoint.pt").is_file()
    code = main(
        [
            "finetune",
            "-m",
            "test-unet3d",
            "--labelled",
            str(dark_balls / "labelled"),
            "--iterations",
            "20",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--resume",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "registered test-unet3d-ft-1 (parent test-unet3d)" in out
    card = load_card(home / "models" / "test-unet3d-ft-1" / "card.json")
    assert json.loads((home / "models" / "test-unet3d-ft-1" / "training_log.json").read_text(encoding="utf-8"))
    assert card.parent == "test-unet3d" and not (home / "models" / "test-unet3d-ft-1.training").exists()


def test_resume_offers_the_newest_unfinished_run_and_never_a_finished_one(home):
    import os

    from MedSegSuiteLib.slicer.finetuning import unfinished_run
    from MedSegSuiteLib.training.finetune import next_finetune_id

    registry = ModelRegistry()
    for n, finished in ((1, False), (2, False), (3, True)):
        work = registry.user_dir / f"ball-ft-{n}.training"
        work.mkdir(parents=True)
        (work / "checkpoint.pt").write_bytes(b"state")
        os.utime(work / "checkpoint.pt", (1000 + n, 1000 + n))
        if finished:  # killed after writing its model, before removing its work folder
            (registry.user_dir / f"ball-ft-{n}").mkdir()
    assert next_finetune_id("ball", registry, resume=True) == "ball-ft-2"
    assert unfinished_run("ball-ft-1", registry.user_dir) == ("ball-ft-2", 0)
    assert next_finetune_id("ball", registry) == "ball-ft-4"


def _state(directory):
    from MedSegSuiteLib.models import load_model

    return {k: v.float() for k, v in load_model(str(directory)).network.state_dict().items() if v.is_floating_point()}


def test_a_model_worse_than_its_parent_is_reported_as_such_and_not_selected(home, unet3d_dir, dark_balls):
    """Adam at a learning rate of 1 wrecks every weight in one step: the held-back Dice must fall, and say so."""
    from MedSegSuiteLib.training.verdict import FinetuneVerdict

    ModelRegistry().import_model(unet3d_dir)
    entry = finetune_model(
        FinetuneOptions(
            parent="test-unet3d",
            labelled=dark_balls / "labelled",
            iterations=3,
            batch_size=1,
            lr=1.0,
            device="cpu",
            held_out=2,
            keep_parent_weights=False,  # no checkpoint selection: the wrecked network is what is saved
        )
    )
    verdict = FinetuneVerdict.from_dict(entry.card.training["finetune"]["verdict"])
    assert verdict is not None and verdict.held_back == 2 and not verdict.kept_parent
    assert verdict.dice_after < verdict.dice_before - 0.1, verdict
    assert verdict.outcome == "not better" and not verdict.selected and not verdict.better
    assert verdict.sentence("test-unet3d").startswith("Worse than test-unet3d on the 2 held-back cases: Dice ")
    assert ModelRegistry().get("test-unet3d-ft-1").card.training["finetune"]["verdict"]["selected"] is False


def test_the_cli_keeps_the_parents_weights_when_nothing_beats_it_and_warns_that_the_model_is_not_selected(
    home, unet3d_dir, dark_balls, capsys
):
    ModelRegistry().import_model(unet3d_dir)
    args = ["finetune", "-m", "test-unet3d", "--labelled", str(dark_balls / "labelled"), "--iterations", "3"]
    args += ["--batch-size", "1", "--lr", "1", "--held-out", "2", "--device", "cpu", "-q"]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert "Not better than test-unet3d: no finetuned version beat it on the 2 held-back cases" in out, out
    assert "WARNING: test-unet3d-ft-1 is NOT selected; keep using test-unet3d." in out
    verdict = load_card(home / "models" / "test-unet3d-ft-1" / "card.json").training["finetune"]["verdict"]
    assert verdict["kept_parent"] and verdict["dice_after"] == verdict["dice_before"] and not verdict["selected"]
    parent, new = _state(unet3d_dir), _state(home / "models" / "test-unet3d-ft-1")
    assert parent.keys() == new.keys() and all(torch.equal(parent[k], new[k]) for k in parent)
    assert main(["models"]) == 0
    assert "test-unet3d (not better, not selected)" in capsys.readouterr().out

    assert main(args + ["--keep-if-worse"]) == 0  # the user may still keep it as the one to use
    out, _ = capsys.readouterr()
    assert "Kept as selected anyway, as asked (--keep-if-worse); use it with -m test-unet3d-ft-2." in out
    verdict = load_card(home / "models" / "test-unet3d-ft-2" / "card.json").training["finetune"]["verdict"]
    assert verdict["outcome"] == "not better" and verdict["selected"]


def test_with_fewer_than_three_labelled_cases_the_gain_is_said_to_be_unchecked(home, unet3d_dir, dark_balls, capsys):
    ModelRegistry().import_model(unet3d_dir)
    listing = dark_balls / "two.txt"
    images = sorted((dark_balls / "labelled" / "images").glob("*.nii.gz"))[:2]
    listing.write_text("".join(f"{p},{dark_balls / 'labelled' / 'labels' / p.name}\n" for p in images), "utf-8")
    args = ["finetune", "-m", "test-unet3d", "--labelled", str(listing), "--iterations", "2", "--batch-size", "1"]
    assert main(args + ["--device", "cpu", "-q"]) == 0
    out, _ = capsys.readouterr()
    assert "The gain could not be checked: with fewer than three labelled cases none was held back" in out, out
    assert "WARNING: test-unet3d-ft-1 is NOT selected" in out


def test_the_distance_to_parent_penalty_keeps_the_student_nearer_its_start(unet3d_dir, dark_balls):
    from MedSegSuiteLib.models import load_model
    from MedSegSuiteLib.training.datasets import discover_cases, load_case

    items = [(c.id, *load_case(c)) for c in discover_cases(dark_balls / "labelled")][:2]
    distances = {}
    for anchor in (0.0, 50.0):
        model = load_model(unet3d_dir)
        start = [p.detach().clone() for p in model.network.parameters()]
        data = TrainingData(
            PatchStore(items, [1], 1, model.card.input.normalization), 1, Augment(), patch_zyx=(16, 32, 32)
        )
        recipe = MeanTeacherRecipe(model.network, 4, lr=1e-2, anchor=anchor)
        for step in range(4):
            parts = recipe.step(data, torch.Generator().manual_seed(step), step)
        assert ("anchor_distance" in parts) == (anchor > 0) and recipe.describe()["anchor"] == anchor
        distances[anchor] = sum(
            float(((p.detach() - s) ** 2).sum()) for p, s in zip(recipe.student.parameters(), start)
        )
    assert 0 < distances[50.0] < 0.5 * distances[0.0], distances


def test_finetuning_does_not_mirror_or_turn_the_cases_unless_asked():
    """Flips swap anatomical sides (anterior/posterior hippocampus): a parent is finetuned on cases as they come."""
    from MedSegSuiteLib.training.finetune import _finetune_augment

    recipe_augment = Augment(flip=0.5, rot90=True, intensity=0.1, noise=0.05)
    kept = _finetune_augment(recipe_augment, {})
    assert kept.flip == 0.0 and kept.rot90 is False and kept.intensity == 0.1 and kept.noise == 0.05
    assert _finetune_augment(recipe_augment, {"augment": {"flip": 0.5}}).flip == 0.5

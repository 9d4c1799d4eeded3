"""Finetuning the bundled D-Net hippocampus model on real MRI (MSD Task04) does not make it worse.

Slow (about a minute on two CPU cores shared with other work) and skipped without ``msd_hippocampus``
in the real-data folder (``../shared/data`` beside the clone, or ``$MEDSEGSUITE_DATA``)
or without the bundled model ``Resources/Models/hippocampus-dnet-lite``. The cases come
from the model card's validation split, which the model was never trained on:

- three labelled cases go to ``medsegsuite finetune`` (a list file), which holds one back
  to check the new model against its parent;
- two more images go in unlabelled (their labels are not given);
- four further labelled cases are never shown to the finetuning at all, not even for
  choosing the checkpoint, and measure the parent and the new model independently.

Whatever the held-back check decides, the command must say it, and the model a user
ends up with must not be worse on the unseen cases than the parent beyond the noise of
a few iterations (0.005 Dice).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

MODEL_ID = "hippocampus-dnet-lite"
DATA = SHARED_DATA / "msd_hippocampus"
ITERATIONS = 4
UNSEEN_NOISE = 0.005

pytestmark = pytest.mark.skipif(
    not (DATA / "images").is_dir(),
    reason=f"real data absent: {DATA} does not exist (put the data folder beside the clone as ../shared/data, "
    "or set MEDSEGSUITE_DATA to where it is)",
)


def _bundled_model() -> Path:
    from MedSegSuiteLib.resources import resources_dir

    folder = resources_dir() / "Models" / MODEL_ID
    if not (folder / "card.json").is_file():
        pytest.skip(f"the bundled model {MODEL_ID} is absent ({folder}); train and package it first")
    return folder


def _write_list(path: Path, ids: list[str], labelled: bool) -> Path:
    lines = []
    for case_id in ids:
        image = DATA / "images" / f"{case_id}.nii.gz"
        lines.append(f"{image},{DATA / 'labels' / f'{case_id}.nii.gz'}" if labelled else str(image))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_finetuning_the_bundled_hippocampus_model_on_real_cases_is_not_worse_on_other_real_cases(
    tmp_path, monkeypatch, capsys
):
    from MedSegSuiteLib.cli import main
    from MedSegSuiteLib.evaluation import evaluate_model
    from MedSegSuiteLib.inference import Predictor
    from MedSegSuiteLib.models import ModelRegistry, load_model
    from MedSegSuiteLib.models.weights import sha256_file
    from MedSegSuiteLib.training.datasets import discover_cases, load_cases
    from MedSegSuiteLib.training.verdict import FinetuneVerdict

    folder = _bundled_model()
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    available = {path.name[: -len(".nii.gz")] for path in (DATA / "labels").glob("*.nii.gz")}
    unseen = sorted(set(card.get("training", {}).get("validation_ids", [])) & available)
    if len(unseen) < 9:
        pytest.skip(f"{MODEL_ID}'s card names fewer than 9 validation cases present in {DATA}")
    labelled, unlabelled, independent = unseen[0:3], unseen[3:5], unseen[5:9]
    registry = ModelRegistry()
    parent = registry.get(MODEL_ID)
    assert parent.source == "bundled"
    parent_sha = sha256_file(parent.weights_path)

    args = ["finetune", "-m", MODEL_ID, "--iterations", str(ITERATIONS), "--device", "cpu", "-q"]
    args += ["--labelled", str(_write_list(tmp_path / "labelled.txt", labelled, True))]
    args += ["--unlabelled", str(_write_list(tmp_path / "unlabelled.txt", unlabelled, False))]
    assert main(args) == 0
    out = capsys.readouterr().out
    new = ModelRegistry().get(f"{MODEL_ID}-ft-1")
    assert new.card.parent == MODEL_ID and new.source == "user"
    facts = new.card.training["finetune"]
    assert facts["labelled"] == 3 and facts["unlabelled"] == 2 and len(facts["held_out"]) == 1
    verdict = FinetuneVerdict.from_dict(facts["verdict"])
    assert verdict is not None and verdict.held_back == 1
    assert verdict.sentence(MODEL_ID) in out, out
    assert verdict.dice_after >= verdict.dice_before, "the parent competes as a checkpoint: never worse held back"
    assert verdict.selected == (verdict.dice_after > verdict.dice_before)
    assert ("WARNING" in out) != verdict.selected
    assert sha256_file(parent.weights_path) == parent_sha, "the bundled model must not change"

    # cases neither trained on nor used to choose the checkpoint; the user keeps the parent unless selected
    cases = load_cases([case for case in discover_cases(DATA) if case.id in set(independent)])
    assert len(cases) == 4
    before = evaluate_model(Predictor(load_model(MODEL_ID), device="cpu"), cases).mean()["dice"]
    after = evaluate_model(Predictor(load_model(new.card.id), device="cpu"), cases).mean()["dice"]
    print(f"held back {verdict.dice_before} -> {verdict.dice_after} ({verdict.outcome})")
    print(f"unseen {before:.4f} -> {after:.4f}")
    assert after >= before - UNSEEN_NOISE, f"Dice on unseen cases fell from {before:.4f} to {after:.4f}"

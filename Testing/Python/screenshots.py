"""Regenerate the extension's screenshot, ``Resources/Screenshots/panel.png``, from a real run.

Run from the repository root (needs the test extras: slicer-core and PySide6)::

    python Testing/Python/screenshots.py [-o Resources/Screenshots/panel.png]

What the picture shows is what happened, nothing is staged:

- the MedSegSuite panel (the real ``.ui`` and controllers) through the harness in
  ``Testing/Python/slicer_harness`` (real MRML from slicer-core, offscreen Qt from PySide6);
- the bundled sample loaded as Slicer's Sample Data module loads it: the volume and its
  reference labels (as a segmentation) read by MRML's own storage nodes, under the node
  names the sample's Sample Data source gives them;
- only the bundled models (an empty temporary ``MEDSEGSUITE_HOME``);
- the reference's segments named after their labels (a label map loads as ``Segment_1``,
  ``Segment_2``), as a user would in the Segment Editor;
- a real **Estimate time** of the Finetune section (the reference case checked) and a real
  **Segment** with ``hippocampus-dnet-lite``, both in the real worker process, so the
  estimate, the status line and the output segmentation are real;
- the Refine and Finetune sections open. The Refine section lists the bundled HiDiff models
  for volumes (``hippocampus-hidiff-lite``) with the panel's default settings.

It takes about a minute (most of it the worker's timing of finetuning iterations).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCREENSHOT = REPO / "Resources" / "Screenshots" / "panel.png"
MODEL_ID = "hippocampus-dnet-lite"
WIDTH = 640  # logical pixels; the picture is SCALE times larger
MARGIN = 12
SCALE = 2


def _wait(condition: Any, seconds: float, what: str) -> None:
    """Keep Qt running until ``condition()`` is true; raise ``TimeoutError`` naming ``what`` after ``seconds``."""
    import slicer_harness

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {seconds:.0f} s")
        slicer_harness.process_events()
        time.sleep(0.05)


def load_sample() -> tuple[Any, Any]:
    """Load the bundled sample like Slicer's Sample Data module: ``(volume node, reference segmentation node)``.

    The files, node names and file types are those of the sample's Sample Data source
    (:func:`MedSegSuiteLib.slicer.sample_data.sample_data_source`); MRML's storage nodes read them.
    """
    import slicer

    from MedSegSuiteLib.slicer.sample_data import sample_data_source

    source = sample_data_source()
    scene = slicer.mrmlScene
    nodes = []
    for uri, node_name, file_type in zip(source["uris"], source["nodeNames"], source["loadFileTypes"]):
        path = Path(url2pathname(urlparse(uri).path))
        node_class, storage_class = {
            "VolumeFile": ("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode"),
            "SegmentationFile": ("vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode"),
        }[file_type]
        node = scene.AddNewNodeByClass(node_class, node_name)
        storage = scene.AddNewNodeByClass(storage_class)
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(f"MRML could not read {path}")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        nodes.append(node)
    return nodes[0], nodes[1]


def name_reference_segments(reference: Any) -> None:
    """Name the reference's segments after the labels they hold, as a user does in the Segment Editor.

    A label map file loads as segments ``Segment_1``, ``Segment_2``; the sample's README
    says label 1 is the anterior and label 2 the posterior hippocampus, the names the
    bundled model's card uses, so the Finetune section can match them.
    """
    names = {1: "Anterior hippocampus", 2: "Posterior hippocampus"}
    segmentation = reference.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName(names[segment.GetLabelValue()])


def _check_item(widget: Any, text: str) -> None:
    """Check the row of a list widget whose text is ``text`` (as a click on its box would)."""
    import qt

    for row in range(widget.count()):
        item = widget.item(row)
        if item.text() == text:
            item.setCheckState(qt.Qt.Checked)
            return
    rows = [widget.item(row).text() for row in range(widget.count())]
    raise RuntimeError(f"no row {text!r} in {widget.objectName()} (rows: {rows})")


def render(target: Path, threads: int, timeout: float) -> Path:
    """Run the panel as described in the module docstring and save its picture to ``target``; returns ``target``."""
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("QT_SCALE_FACTOR", str(SCALE))
    import slicer_harness

    slicer_harness.install(testing=False)
    import slicer

    from MedSegSuiteLib.worker.client import WorkerClient

    with tempfile.TemporaryDirectory(prefix="medsegsuite-screenshot-") as temp:
        os.environ["MEDSEGSUITE_HOME"] = str(Path(temp) / "home")
        os.environ.pop("MEDSEGSUITE_RESOURCES", None)
        client = WorkerClient(env={"MEDSEGSUITE_THREADS": str(threads)}, temp_root=temp)
        widget = slicer_harness.open_module_widget(client)
        try:
            ui = widget.ui
            volume, reference = load_sample()
            ui.inputVolumeSelector.setCurrentNode(volume)
            index = ui.modelSelector.findData(MODEL_ID)
            if index < 0:
                raise RuntimeError(f"the bundled model {MODEL_ID} is not listed; is Resources/Models complete?")
            ui.modelSelector.setCurrentIndex(index)
            for section in (ui.refineCollapsibleButton, ui.finetuneCollapsibleButton):
                section.setCollapsed(False)
            ui.finetuneModelSelector.setCurrentIndex(ui.finetuneModelSelector.findData(MODEL_ID))
            slicer_harness.process_events()
            widget.panel.finetune.refresh_cases()
            name_reference_segments(reference)
            widget.panel.finetune.refresh_cases()
            _check_item(ui.finetuneLabelledList, f"{volume.GetName()} + {reference.GetName()}")
            ui.finetuneEstimateButton.click()
            _wait(lambda: not widget.logic.busy, timeout, "Estimate time")
            if widget.logic.finetune_timing is None:
                raise RuntimeError(f"Estimate time did not succeed: {ui.statusLabel.property('text')}")
            ui.segmentButton.click()
            _wait(lambda: not widget.logic.busy, timeout, "Segment")
            status = ui.statusLabel.property("text")
            if not status.startswith("Done"):
                raise RuntimeError(f"the segmentation did not succeed: {status}")
            return _grab(target)
        finally:
            if widget.logic.busy:
                widget.logic.cancel()
                widget.logic.wait(60)
            slicer_harness.unload_modules()
            client.close()
            slicer.mrmlScene.Clear(0)


def _grab(target: Path) -> Path:
    """Save the module panel, :data:`WIDTH` wide and down to the status line, to ``target``.

    The panel gets the height its size hint asks for plus what its word-wrapped texts lack
    at this width; the picture ends :data:`MARGIN` pixels below the status line.
    """
    import slicer
    import slicer_harness
    from PySide6.QtCore import QRect
    from PySide6.QtWidgets import QLabel

    representation = slicer.modules.medsegsuite.widgetRepresentation()
    representation.resize(WIDTH, representation.sizeHint().height())
    representation.show()
    slicer_harness.process_events()
    for _ in range(10):  # the size hint ignores how tall wrapped texts are at this width: add what they lack
        lacking = sum(
            max(0, label.heightForWidth(label.width()) - label.height())
            for label in representation.findChildren(QLabel)
            if label.isVisible() and label.wordWrap()
        )
        if not lacking:
            break
        representation.resize(WIDTH, representation.height() + lacking)
        slicer_harness.process_events()
    status = slicer.util.getModuleWidget("MedSegSuite").ui.statusLabel
    bottom = status.mapTo(representation, status.rect().bottomLeft()).y() + MARGIN
    target.parent.mkdir(parents=True, exist_ok=True)
    if not representation.grab(QRect(0, 0, WIDTH, bottom)).save(str(target)):
        raise RuntimeError(f"could not write {target}")
    representation.hide()
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=SCREENSHOT, help=f"PNG to write (default: {SCREENSHOT})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the worker (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each job may take (default: 600)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    target = render(args.output.resolve(), args.threads, args.timeout)
    print(f"wrote {target} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

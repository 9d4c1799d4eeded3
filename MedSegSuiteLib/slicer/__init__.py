"""The 3D Slicer side of MedSegSuite: MRML adapters, the module logic, the panel and the installer.

Only this package and ``MedSegSuite/MedSegSuite.py`` import ``slicer``. Modules:
:mod:`.volumes` (volume nodes <-> :class:`~MedSegSuiteLib.volume.Volume`, ROI -> voxel box),
:mod:`.segmentations` (label maps -> coded segments), :mod:`.parameters` (the parameter
node), :mod:`.logic` (jobs in the worker), :mod:`.refinement` (segment matching, edits
and undo for refinement steps), :mod:`.exporting` (writing a segmentation node),
:mod:`.panel` and :mod:`.sections` (the Qt panel and its Refine and Export sections),
:mod:`.dependencies` (first-use installation) and :mod:`.testing` (self-test helpers).
Importing the package imports nothing else.
"""

"""MedSegSuite: five published segmentation networks for 3D Slicer and the command line.

Importing the package does no work; import the sub-packages you need
(``MedSegSuiteLib.networks``, ``MedSegSuiteLib.inference``, ``MedSegSuiteLib.io`` ...).
"""

__version__ = "0.1.0"

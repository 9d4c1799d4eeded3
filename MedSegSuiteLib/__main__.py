"""``python -m MedSegSuiteLib`` runs the ``medsegsuite`` command line."""

import sys

from .cli import main

sys.exit(main())

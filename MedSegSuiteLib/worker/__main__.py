"""``python -m MedSegSuiteLib.worker`` runs the background worker (see :mod:`MedSegSuiteLib.worker.server`)."""

import sys

from .server import main

sys.exit(main())

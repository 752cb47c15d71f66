"""``python -m lmms_emi.cli ...`` (same as ``lmms-emi ...``)."""

import sys

from lmms_emi.cli import main

sys.exit(main())

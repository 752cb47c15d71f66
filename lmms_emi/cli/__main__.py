"""``python -m lmms_emi.cli ...`` (same as ``lmms-emi ...``)."""

from lmms_emi.cli import console_main

console_main()

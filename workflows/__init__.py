"""Nipype workflow factories (installed as ``lesionpipe.workflows``)."""

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

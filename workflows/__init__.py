"""Nipype workflow factories (installed as lesionpipe.workflows)."""

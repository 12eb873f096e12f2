"""Nipype interfaces over lesionpipe's pure functions.

Nipype checks online for newer versions unless ``NIPYPE_NO_ET`` is set; lesionpipe never touches
the network, so the Nipype layer (this package and ``lesionpipe.workflows``) sets it before Nipype is
first imported. The pure modules never import Nipype.
"""

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

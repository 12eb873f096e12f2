"""lesionpipe: count gadolinium-enhancing lesions (GELs) in multiple sclerosis trial MRI.

Pure modules (``lesionpipe.lesions``, ``lesionpipe.preproc``, ``lesionpipe.stats`` ...) never import
Nipype; the Nipype graphs live in ``lesionpipe.workflows``. Importing this package has no side effects.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

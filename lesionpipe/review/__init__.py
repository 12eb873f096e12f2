"""lesionpipe.review: the central-reader web application.

``store`` (SQLite, append-only tables, hash-chained audit), ``visitdata`` (pipeline outputs and
display reorientation), ``grow`` (added-lesion region growing), ``consensus`` (double-reading
rules), ``service`` (who may see and do what), ``app`` (Flask routes), ``export`` and ``cli``.
"""

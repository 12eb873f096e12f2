"""lesionpipe.reports: the offline, self-contained HTML QA report of one visit.

``write_visit_report`` is imported lazily so that ``import lesionpipe.reports`` stays cheap (it
pulls in matplotlib only when a report is drawn).
"""

__all__ = ["write_visit_report", "radiological_slice"]


def __getattr__(name):
    if name == "write_visit_report":
        from lesionpipe.reports.visit import write_visit_report
        return write_visit_report
    if name == "radiological_slice":
        from lesionpipe.reports.render import radiological_slice
        return radiological_slice
    raise AttributeError(f"module 'lesionpipe.reports' has no attribute {name!r}")

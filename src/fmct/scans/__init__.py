"""The scans of a file tree, as every verb that reads DICOM/NIfTI meets them (``fmct ingest`` into a store,
``fmct predict`` in memory): one plan (:mod:`fmct.scans.plan`: the scans to read and every input that is
none, with its reason), one job and its reasons (:mod:`fmct.scans.job`), and one crash-isolated pool of
reader processes (:mod:`fmct.scans.pool`). So a scan has the same id, the same reading and the same reason
whichever verb reads it, and a native crash costs one scan in either.
"""

from fmct.scans.job import ScanJob, ScanResult, died, failed, read_canonical
from fmct.scans.plan import ScanPlan, SkippedInput, plan_scans, read_one_scan
from fmct.scans.pool import WorkerPool

__all__ = [
    "ScanJob",
    "ScanResult",
    "ScanPlan",
    "SkippedInput",
    "WorkerPool",
    "died",
    "failed",
    "plan_scans",
    "read_canonical",
    "read_one_scan",
]

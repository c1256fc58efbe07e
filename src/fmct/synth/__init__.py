"""Synthetic head CT: MNI152 anatomy, labelled pathologies and scanner/site differences (``fmct synth``).

``make_subject(seed, site)`` gives one scan in memory (HU volume, affine, voxel masks, labels);
``generate_cohort(out, n, ...)`` writes a cohort as DICOM or NIfTI with ``labels.csv``.
"""

from fmct.synth.cohort import CohortSummary, generate_cohort, scan_seed
from fmct.synth.pathology import BITS, FINDINGS
from fmct.synth.sites import SITES, SiteProfile, parse_sites
from fmct.synth.subject import Subject, SyntheticScan, make_subject

__all__ = [
    "BITS",
    "FINDINGS",
    "SITES",
    "CohortSummary",
    "SiteProfile",
    "Subject",
    "SyntheticScan",
    "generate_cohort",
    "make_subject",
    "parse_sites",
    "scan_seed",
]

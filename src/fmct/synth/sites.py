"""Named sites: a scanner with its reconstruction habits, and a patient population with its prevalences.

Holding one site out of training measures out-of-distribution generalisation: the sites differ in
vendor, kernels, slice thickness, dose (noise), gantry tilt, coverage, rescale convention and beam
hardening, and in the age mix and the frequency of each finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmct.errors import UsageError


@dataclass(frozen=True)
class SiteProfile:
    """One site. Thicknesses in mm, noise as the HU standard deviation of a 5 mm soft-kernel slice.

    Attributes:
        prevalence: probability of each primary finding per scan (haemorrhage subtypes, infarct, mass,
            hydrocephalus, fracture). Atrophy follows age; ich and midline_shift follow from the others.
        rescale: (slope, intercept) of the stored pixel values; an intercept of 0 stores signed HU.
        hu_offset: calibration offset of this scanner's water (HU).
        tilt_probability / max_tilt_deg: how often and how much the gantry is tilted.
        partial_coverage_probability: how often the scan misses the vertex or the skull base.
    """

    name: str
    manufacturer: str
    model: str
    soft_kernel: str
    sharp_kernel: str
    kvp: float
    thickness_mm: float  # the routine series
    thin_mm: float  # the thin reconstruction of the same acquisition
    fov_mm: tuple[float, float]
    noise_hu: float
    rescale: tuple[float, float]
    hu_offset: float
    beam_hardening: float
    tilt_probability: float
    max_tilt_deg: float
    partial_coverage_probability: float
    age_mean: float
    age_sd: float
    prevalence: dict = field(default_factory=dict)
    institution: str = ""


SITES: dict[str, SiteProfile] = {
    # A community hospital: older GE scanner, tilted axial protocol, routine 5 mm, mixed adults.
    "A": SiteProfile(
        name="A",
        manufacturer="GE MEDICAL SYSTEMS",
        model="LightSpeed VCT",
        soft_kernel="STANDARD",
        sharp_kernel="BONE",
        kvp=120.0,
        thickness_mm=5.0,
        thin_mm=0.625,
        fov_mm=(220.0, 250.0),
        noise_hu=3.0,
        rescale=(1.0, -1024.0),
        hu_offset=0.0,
        beam_hardening=1.0,
        tilt_probability=0.7,
        max_tilt_deg=20.0,
        partial_coverage_probability=0.05,
        age_mean=58.0,
        age_sd=18.0,
        prevalence={
            "iph": 0.10,
            "ivh": 0.05,
            "sdh": 0.10,
            "edh": 0.04,
            "sah": 0.08,
            "infarct": 0.10,
            "mass": 0.05,
            "hydrocephalus": 0.04,
            "fracture": 0.06,
        },
        institution="Synthetic Community Hospital A",
    ),
    # A trauma centre: Siemens helical, no tilt, 4.8 mm with sharp iterative kernels, more trauma.
    "B": SiteProfile(
        name="B",
        manufacturer="SIEMENS",
        model="SOMATOM Definition AS+",
        soft_kernel="J40s",
        sharp_kernel="J70h",
        kvp=120.0,
        thickness_mm=4.8,
        thin_mm=1.0,
        fov_mm=(200.0, 230.0),
        noise_hu=2.8,
        rescale=(1.0, -1024.0),
        hu_offset=2.0,
        beam_hardening=0.6,
        tilt_probability=0.0,
        max_tilt_deg=0.0,
        partial_coverage_probability=0.1,
        age_mean=48.0,
        age_sd=20.0,
        prevalence={
            "iph": 0.10,
            "ivh": 0.06,
            "sdh": 0.16,
            "edh": 0.08,
            "sah": 0.12,
            "infarct": 0.05,
            "mass": 0.03,
            "hydrocephalus": 0.03,
            "fracture": 0.14,
        },
        institution="Synthetic Trauma Centre B",
    ),
    # A stroke and oncology centre: Canon low-dose protocol, 3 mm, signed HU storage, older patients.
    "C": SiteProfile(
        name="C",
        manufacturer="CANON_MEC",
        model="Aquilion ONE",
        soft_kernel="FC21",
        sharp_kernel="FC30",
        kvp=135.0,
        thickness_mm=3.0,
        thin_mm=0.5,
        fov_mm=(240.0, 260.0),
        noise_hu=4.0,
        rescale=(1.0, 0.0),
        hu_offset=-3.0,
        beam_hardening=1.5,
        tilt_probability=0.2,
        max_tilt_deg=12.0,
        partial_coverage_probability=0.2,
        age_mean=70.0,
        age_sd=12.0,
        prevalence={
            "iph": 0.12,
            "ivh": 0.05,
            "sdh": 0.08,
            "edh": 0.02,
            "sah": 0.06,
            "infarct": 0.20,
            "mass": 0.10,
            "hydrocephalus": 0.06,
            "fracture": 0.03,
        },
        institution="Synthetic Stroke Centre C",
    ),
    # A university hospital: Philips, thin routine slices, a water calibration a little high and little
    # beam hardening (C's scanner shifts the other way). Its heads choose among pretraining recipes for
    # robustness to an unseen scanner, so that site C stays a test-only site.
    "D": SiteProfile(
        name="D",
        manufacturer="Philips",
        model="Brilliance iCT",
        soft_kernel="UB",
        sharp_kernel="YC",
        kvp=120.0,
        thickness_mm=4.0,
        thin_mm=0.67,
        fov_mm=(210.0, 240.0),
        noise_hu=3.5,
        rescale=(1.0, -1024.0),
        hu_offset=4.0,
        beam_hardening=0.3,
        tilt_probability=0.3,
        max_tilt_deg=15.0,
        partial_coverage_probability=0.1,
        age_mean=62.0,
        age_sd=16.0,
        prevalence={
            "iph": 0.10,
            "ivh": 0.05,
            "sdh": 0.12,
            "edh": 0.03,
            "sah": 0.10,
            "infarct": 0.12,
            "mass": 0.06,
            "hydrocephalus": 0.05,
            "fracture": 0.07,
        },
        institution="Synthetic University Hospital D",
    ),
}


def parse_sites(text: str) -> list[SiteProfile]:
    """Site profiles from a comma-separated list of names (``"A,B,C"``); ValueError names unknown ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SITES]
    if not names or unknown:
        raise UsageError(f"unknown site {unknown[0] if unknown else text!r}; known sites: {', '.join(SITES)}")
    return [SITES[name] for name in names]

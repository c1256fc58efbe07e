"""Pathologies painted into a subject's head in the template frame, each with its voxel mask.

A painter changes the HU volume in place, sets its finding's bit in the label volume and returns a
:class:`Lesion` that says how much space it occupies, so that the subject can add the mass effect
(:class:`Push`) that shifts the midline. Masks are bits of one uint16 volume (``BITS``): a voxel may
belong to several findings (intraventricular extension of a parenchymal bleed, blood over a fracture).
Sizes are drawn from subtle (a few mm) to obvious by a severity in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmct.datasets.generic import FINDINGS
from fmct.synth.anatomy import LANDMARKS, ORIGIN_MM, SHAPE, SPACING_MM, HeadTemplate, Tissues

HAEMORRHAGES = ("iph", "ivh", "sdh", "edh", "sah")
STRUCTURES = ("falx",)
# One bit per finding, then the structures the tests and previews need (the falx measures the shift).
BITS = {name: 1 << i for i, name in enumerate(FINDINGS + STRUCTURES)}

VOXEL_ML = SPACING_MM**3 / 1000.0
CAVITY_CENTRE_MM = np.array([0.0, -17.0, 12.0])  # centre of the inner table's best-fitting ellipsoid
CAVITY_SEMI_AXES_MM = np.array([70.0, 88.0, 70.0])


@dataclass
class Push:
    """Mass effect of a space-occupying lesion: a lateral displacement towards the other side.

    The displacement (head frame, mm) is ``-side * amplitude_mm * exp(-|(y, z) - centre|^2 / 2 width^2)``
    along x, anchored to zero at the inner table and decaying across the opposite hemisphere.
    """

    centre_mm: tuple[float, float, float]
    side: int  # +1 lesion in the right hemisphere (pushes towards -x), -1 left
    amplitude_mm: float
    width_mm: float = 32.0


@dataclass
class Lesion:
    """What a painter did: the finding, the blood/tissue volume (ml), its side and its mass effect."""

    finding: str
    volume_ml: float
    side: int
    subtype: str = ""
    push: Push | None = None


@dataclass
class Canvas:
    """The arrays a painter edits (template frame): HU, label bits, and the tissues it paints over."""

    hu: np.ndarray  # float32 (X, Y, Z) HU
    bits: np.ndarray  # uint16 (X, Y, Z), one bit per finding (BITS)
    tissues: Tissues
    template: HeadTemplate
    blood_hu: float = 65.0  # acute blood of this subject (haematocrit)


# ------------------------------------------------------------------------------------------- helpers
def _box(centre_mm, radius_mm: float) -> tuple[slice, slice, slice]:
    """The template-grid index box of a cube of half-side ``radius_mm`` around ``centre_mm``."""
    lo = np.floor((np.asarray(centre_mm) - radius_mm - ORIGIN_MM) / SPACING_MM).astype(int)
    hi = np.ceil((np.asarray(centre_mm) + radius_mm - ORIGIN_MM) / SPACING_MM).astype(int) + 1
    return tuple(slice(max(0, lo[d]), min(SHAPE[d], hi[d])) for d in range(3))


def _paint(canvas: Canvas, box, mask: np.ndarray, finding: str, hu_value) -> float:
    """Set HU inside ``mask`` (within ``box``), mark the finding's bit; return the painted volume (ml)."""
    region = canvas.hu[box]
    region[mask] = hu_value if np.isscalar(hu_value) else hu_value[mask]
    canvas.bits[box][mask] |= BITS[finding]
    return float(mask.sum()) * VOXEL_ML


def _surface_point(template: HeadTemplate, direction: np.ndarray) -> np.ndarray:
    """The inner-table point (mm) reached from the cavity centre along ``direction``."""
    direction = direction / np.linalg.norm(direction)
    for radius in np.arange(20.0, 130.0, 0.75):
        point = CAVITY_CENTRE_MM + radius * direction
        index = np.round((point - ORIGIN_MM) / SPACING_MM).astype(int)
        if np.any(index < 0) or np.any(index >= template.cavity.shape) or template.cavity[tuple(index)] < 0.5:
            return CAVITY_CENTRE_MM + (radius - 0.75) * direction
    return point


def _convexity_direction(rng: np.random.Generator, side: int, z_range=(-0.1, 0.75)) -> np.ndarray:
    """A random direction from the cavity centre to the lateral convexity of one hemisphere."""
    azimuth = rng.uniform(-1.1, 1.1)  # radians around the lateral axis, front to back
    elevation = rng.uniform(*z_range)
    return np.array([side * np.cos(azimuth) * np.cos(elevation), np.sin(azimuth), np.sin(elevation)])


def _angle_from(coords: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Angle (radians) between ``direction`` and the rays from the cavity centre to ``coords``."""
    rays = coords - CAVITY_CENTRE_MM[:, None, None, None]
    cos = np.tensordot(direction / np.linalg.norm(direction), rays, axes=1) / np.maximum(
        np.linalg.norm(rays, axis=0), 1e-3
    )
    return np.arccos(np.clip(cos, -1, 1))


def _irregular(canvas: Canvas, box, amount: float) -> np.ndarray:
    """Smooth noise (~N(0, amount)) in the box, to roughen the boundary of a lesion."""
    return canvas.template.bone_texture[box] * amount


def midline_push(volume_ml: float, centre_mm, side: int, rng: np.random.Generator) -> Push:
    """The mass effect of ``volume_ml`` of space-occupying tissue: about 1 mm of shift per 6 ml."""
    amplitude = min(18.0, volume_ml / 6.0 * rng.uniform(0.7, 1.3))
    return Push(centre_mm=tuple(float(c) for c in centre_mm), side=side, amplitude_mm=amplitude)


# ------------------------------------------------------------------------------------------ painters
def extra_axial(canvas: Canvas, rng: np.random.Generator, severity: float, finding: str) -> Lesion:
    """Epidural (biconvex lens, bounded by sutures) or subdural (crescent) haematoma on the convexity."""
    template = canvas.template
    side = int(rng.choice([-1, 1]))
    direction = _convexity_direction(rng, side)
    surface = _surface_point(template, direction)
    radius_to_surface = float(np.linalg.norm(surface - CAVITY_CENTRE_MM))
    subtype = ""
    if finding == "edh":
        thickness = 3.0 + 27.0 * severity
        half_angle = (18.0 + 22.0 * severity) / radius_to_surface * 1.6
        blood = canvas.blood_hu + rng.uniform(-5, 10)
    else:
        thickness = 2.0 + 16.0 * severity
        half_angle = rng.uniform(0.45, 0.85)
        subtype = str(rng.choice(["acute", "acute", "acute", "chronic", "mixed"]))
        blood = {"acute": canvas.blood_hu, "chronic": rng.uniform(4, 20), "mixed": canvas.blood_hu - 25}[subtype]
    reach = radius_to_surface * np.sin(min(half_angle, 1.4)) + thickness + 6
    box = _box(surface, reach)
    coords = template.coords[(slice(None),) + box]
    angle = _angle_from(coords, direction)
    profile = np.clip(1 - (angle / half_angle) ** 2, 0, None)
    local = thickness * (profile if finding == "edh" else np.sqrt(profile))
    x, y = coords[0], coords[1]
    if finding == "edh":
        # The dura is fixed at the sutures: an epidural collection stops at the coronal and lambdoid lines.
        lm = LANDMARKS
        frontal = surface[1] > lm.coronal_suture_y
        occipital = surface[1] < lm.lambdoid_suture_y
        if frontal:
            local *= np.clip((y - lm.coronal_suture_y) / 4, 0, 1)
        elif occipital:
            local *= np.clip((lm.lambdoid_suture_y - y) / 4, 0, 1)
        else:
            local *= np.clip((lm.coronal_suture_y - y) / 4, 0, 1) * np.clip((y - lm.lambdoid_suture_y) / 4, 0, 1)
    local *= np.clip((side * x - 3.0) / 3.0, 0, 1)  # neither crosses the midline (falx, sagittal suture)
    local *= np.clip((coords[2] + 15.0) / 5.0, 0, 1)  # nor the tentorium: both stay supratentorial
    depth = template.depth_mm[box]
    mask = (depth > 0) & (depth < local) & (template.cavity[box] > 0.3)
    if subtype == "mixed":  # a hyperacute swirl in a hypodense collection
        blood = np.where(_irregular(canvas, box, 1.0) > 0.4, canvas.blood_hu, blood).astype(np.float32)
    volume = _paint(canvas, box, mask, finding, blood)
    centre = surface - direction / np.linalg.norm(direction) * thickness / 2
    return Lesion(finding, volume, side, subtype, midline_push(volume, centre, side, rng))


def intraparenchymal(canvas: Canvas, rng: np.random.Generator, severity: float) -> Lesion:
    """A haematoma in the basal ganglia, thalamus, a lobe or the cerebellum, with a hypodense oedema rim."""
    template = canvas.template
    side = int(rng.choice([-1, 1]))
    site = rng.choice(["putamen", "thalamus", "lobar", "lobar", "cerebellum"])
    if site == "putamen":
        centre = np.array([side * 24.0, 2.0, 2.0])
    elif site == "thalamus":
        centre = np.array([side * 12.0, -18.0, 6.0])
    elif site == "cerebellum":
        centre = np.array([side * 22.0, -62.0, -32.0])
    else:
        direction = _convexity_direction(rng, side, z_range=(0.0, 0.8))
        centre = CAVITY_CENTRE_MM + 0.55 * (_surface_point(template, direction) - CAVITY_CENTRE_MM)
    radius = 2.5 + 22.0 * severity**1.5
    if site in ("thalamus", "cerebellum"):
        radius = min(radius, 14.0)
    semi = radius * rng.uniform(0.75, 1.3, size=3)
    rim_mm = rng.uniform(1.5, 3.0) + 0.25 * radius
    box = _box(centre, semi.max() * 1.3 + rim_mm + 3)
    coords = template.coords[(slice(None),) + box]
    r = np.sqrt(sum(((coords[d] - centre[d]) / semi[d]) ** 2 for d in range(3))) + _irregular(canvas, box, 0.12)
    brain = (canvas.tissues.gm[box] + canvas.tissues.wm[box]) > 0.4
    mask = (r < 1) & brain
    oedema = (r >= 1) & (r < 1 + rim_mm / radius) & brain
    canvas.hu[box][oedema] -= rng.uniform(5, 10)
    blood = canvas.blood_hu + rng.uniform(0, 18)
    volume = _paint(canvas, box, mask, "iph", blood)
    return Lesion(
        "iph", volume, side, site, midline_push(1.4 * volume, centre, side, rng) if site != "cerebellum" else None
    )


def intraventricular(canvas: Canvas, rng: np.random.Generator, severity: float) -> Lesion:
    """Blood layering in the dependent (occipital) horns of the lateral ventricles, or a cast filling them."""
    template = canvas.template
    ventricle = canvas.tissues.ventricle
    box = _box(np.array([0.0, -15.0, 5.0]), 60.0)
    coords = template.coords[(slice(None),) + box]
    inside = ventricle[box] > 0.5
    side = int(rng.choice([-1, 0, 1]))  # 0: both sides
    if side:
        inside &= np.sign(coords[0]) == side
    y_inside = coords[1][inside]
    if y_inside.size == 0:
        return Lesion("ivh", 0.0, side)
    # Supine patients: blood sinks to the most posterior (lowest y) part of the ventricles.
    level = np.percentile(y_inside, 3 + 60 * severity**1.3)
    mask = inside & (coords[1] <= level)
    blood = canvas.blood_hu - rng.uniform(0, 12)
    return Lesion("ivh", _paint(canvas, box, mask, "ivh", blood), side)


def subarachnoid(canvas: Canvas, rng: np.random.Generator, severity: float) -> Lesion:
    """Blood replacing the CSF of the basal cisterns, a Sylvian fissure or convexity sulci."""
    template = canvas.template
    tissues = canvas.tissues
    pattern = rng.choice(["basal", "sylvian", "convexity"])
    side = int(rng.choice([-1, 1]))
    if pattern == "basal":
        centre, radius = np.array([0.0, -8.0, -16.0]), 8.0 + 18.0 * severity
        side = 0
    elif pattern == "sylvian":
        centre, radius = np.array([side * 40.0, 6.0, -6.0]), 6.0 + 22.0 * severity
    else:
        direction = _convexity_direction(rng, side, z_range=(0.2, 1.0))
        centre, radius = _surface_point(template, direction), 5.0 + 25.0 * severity
    box = _box(centre, radius + 3)
    coords = template.coords[(slice(None),) + box]
    distance = np.sqrt(sum((coords[d] - centre[d]) ** 2 for d in range(3)))
    sulcal_csf = tissues.csf[box] - tissues.ventricle[box]
    mask = (distance < radius * (1 + _irregular(canvas, box, 0.15))) & (sulcal_csf > 0.3)
    # Blood mixes with CSF: the density rises in proportion to the CSF fraction it replaces.
    blood = canvas.hu[box] + sulcal_csf * (canvas.blood_hu - rng.uniform(5, 20) - 6.0)
    return Lesion("sah", _paint(canvas, box, mask, "sah", blood), side, str(pattern))


def infarct(canvas: Canvas, rng: np.random.Generator, severity: float, wm_hu: float) -> Lesion:
    """A hypodense arterial territory (MCA, ACA or PCA) with loss of grey-white differentiation."""
    template = canvas.template
    tissues = canvas.tissues
    side = int(rng.choice([-1, 1]))
    territory = rng.choice(["mca", "mca", "aca", "pca"])
    origin, axis = {
        "mca": ((side * 18.0, 4.0, -10.0), (side * 1.0, 0.05, 0.45)),
        "aca": ((side * 6.0, 22.0, -2.0), (side * 0.08, 0.25, 1.0)),
        "pca": ((side * 12.0, -28.0, -10.0), (side * 0.25, -1.0, 0.15)),
    }[territory]
    origin, axis = np.array(origin), np.array(axis) / np.linalg.norm(axis)
    half_angle = np.radians(8 + 42 * severity)
    # A branch occlusion covers a cone around a random part of the territory, the trunk all of it.
    axis = axis + rng.normal(0, 0.25 * (1 - severity), 3)
    axis /= np.linalg.norm(axis)
    start_mm = 45.0 * (1 - severity) * rng.uniform(0.3, 1.0)
    box = _box(origin + axis * 50, 75)
    coords = template.coords[(slice(None),) + box]
    rays = coords - origin[:, None, None, None]
    distance = np.linalg.norm(rays, axis=0)
    cos = np.tensordot(axis, rays, axes=1) / np.maximum(distance, 1e-3)
    brain = (tissues.gm[box] + tissues.wm[box]) > 0.5
    mask = (cos > np.cos(half_angle)) & (distance > start_mm) & brain & (side * coords[0] > 2)
    # Cytotoxic oedema: grey and white matter both fall to below normal white matter.
    infarct_hu = wm_hu - (2.0 + 12.0 * severity * rng.uniform(0.6, 1.0))
    value = tissues.csf[box] * canvas.hu[box] + (1 - tissues.csf[box]) * infarct_hu
    return Lesion("infarct", _paint(canvas, box, mask, "infarct", value.astype(np.float32)), side, str(territory))


def mass(canvas: Canvas, rng: np.random.Generator, severity: float) -> Lesion:
    """A tumour (near-isodense, sometimes calcified) with finger-like white-matter oedema and mass effect."""
    template = canvas.template
    tissues = canvas.tissues
    side = int(rng.choice([-1, 1]))
    direction = _convexity_direction(rng, side, z_range=(-0.05, 0.8))
    centre = CAVITY_CENTRE_MM + rng.uniform(0.45, 0.65) * (_surface_point(template, direction) - CAVITY_CENTRE_MM)
    radius = 4.0 + 22.0 * severity
    oedema_mm = radius * rng.uniform(0.5, 1.5)
    box = _box(centre, radius * 1.3 + oedema_mm + 3)
    coords = template.coords[(slice(None),) + box]
    semi = radius * rng.uniform(0.8, 1.2, size=3)
    r = np.sqrt(sum(((coords[d] - centre[d]) / semi[d]) ** 2 for d in range(3))) + _irregular(canvas, box, 0.1)
    brain = (tissues.gm[box] + tissues.wm[box]) > 0.4
    mask = (r < 1) & brain
    oedema = np.clip(1 - (r - 1) * radius / oedema_mm, 0, 1) * (r >= 1) * tissues.wm[box]
    canvas.hu[box] -= (oedema * rng.uniform(8, 14)).astype(np.float32)
    tumour = rng.uniform(30, 46) + _irregular(canvas, box, 4.0)
    if rng.random() < 0.25:
        tumour = np.where(_irregular(canvas, box, 1.0) > 1.6, 250.0, tumour)
    volume = _paint(canvas, box, mask, "mass", tumour.astype(np.float32))
    oedema_ml = float(oedema.sum()) * VOXEL_ML
    return Lesion("mass", volume, side, push=midline_push(volume + 0.5 * oedema_ml, centre, side, rng))


def fracture(canvas: Canvas, rng: np.random.Generator, severity: float, near: np.ndarray | None = None) -> Lesion:
    """A lucent line through the calvarium, 1.5-3 mm wide and 15-80 mm long (near ``near``, if given)."""
    template = canvas.template
    if near is None:
        side = int(rng.choice([-1, 1]))
        direction = _convexity_direction(rng, side, z_range=(0.0, 1.0))
    else:
        direction = near - CAVITY_CENTRE_MM
        side = int(np.sign(direction[0])) or 1
    direction = direction / np.linalg.norm(direction)
    tangent = np.cross(direction, rng.normal(size=3))
    tangent /= np.linalg.norm(tangent)
    normal = np.cross(direction, tangent)  # the fracture plane contains the ray and the tangent
    surface = _surface_point(template, direction)
    radius = float(np.linalg.norm(surface - CAVITY_CENTRE_MM))
    length = 15.0 + 65.0 * severity
    width = rng.uniform(1.6, 3.0)
    box = _box(surface, length / 2 + 20)
    coords = template.coords[(slice(None),) + box]
    rays = coords - CAVITY_CENTRE_MM[:, None, None, None]
    off_plane = np.abs(np.tensordot(normal, rays, axes=1))
    along = np.arctan2(np.tensordot(tangent, rays, axes=1), np.tensordot(direction, rays, axes=1)) * radius
    depth_out = template.outside_mm[box]
    bone = (depth_out > 0) & (depth_out < template.thickness_mm[box]) & (canvas.hu[box] > 300)
    mask = bone & (off_plane < width / 2) & (np.abs(along) < length / 2)
    return Lesion("fracture", _paint(canvas, box, mask, "fracture", rng.uniform(10, 60)), side)


def beam_hardening(canvas: Canvas, rng: np.random.Generator, strength: float) -> None:
    """Dark streaks between the petrous bones (Hounsfield bar) and a bright rim under the inner table."""
    template = canvas.template
    x, y, z = template.coords
    between_petrous = np.exp(-((x / 30) ** 2 + ((y + 25) / 14) ** 2 + ((z + 32) / 8) ** 2))
    streaks = 1 + 0.6 * np.sin(0.45 * y + rng.uniform(0, 6.3)) * np.cos(0.2 * x)
    inside = template.cavity
    canvas.hu -= (strength * 14.0 * between_petrous * streaks * inside).astype(np.float32)
    canvas.hu += (strength * 5.0 * np.exp(-template.depth_mm / 3.0) * inside).astype(np.float32)

"""The canonical head: MNI152 brain anatomy plus a procedural skull, scalp, face and skull base.

Everything here lives in the *template frame*: MNI152 coordinates in mm (RAS+: +x right, +y anterior,
+z superior) sampled on one fixed grid of 1.5 mm (``TEMPLATE_GRID``). :func:`head_template` builds the
subject-independent maps once per process (loading the NIfTI templates is the slow part); then
:func:`render_head` turns them into one subject's HU volume in a few tens of milliseconds, with
per-subject tissue densities, skull thickness and age-dependent sulcal and ventricular widening.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SPACING_MM = 1.5
# Grid origin (mm) and shape: x -90..90, y -132..96, z -87..105. x = 0 (the midline) is a grid plane.
ORIGIN_MM = np.array([-90.0, -132.0, -87.0])
SHAPE = (121, 153, 129)

AIR_HU = -1000.0


@dataclass(frozen=True)
class Landmarks:
    """Approximate MNI positions (mm) of structures the MNI brain templates do not contain."""

    globe_centre: tuple[float, float, float] = (32.0, 58.0, -38.0)  # mirrored for the left eye
    globe_radius_mm: float = 12.0
    frontal_sinus: tuple[float, float, float] = (0.0, 70.0, 2.0)
    sphenoid_sinus: tuple[float, float, float] = (0.0, 14.0, -44.0)
    ethmoid_cells: tuple[float, float, float] = (0.0, 45.0, -38.0)
    mastoid: tuple[float, float, float] = (52.0, -30.0, -44.0)  # mirrored
    pineal: tuple[float, float, float] = (0.0, -30.0, 4.0)
    choroid_glomus: tuple[float, float, float] = (27.0, -42.0, 14.0)  # atrium of the lateral ventricle
    coronal_suture_y: float = 12.0  # where the frontal bone meets the parietal bones
    lambdoid_suture_y: float = -78.0  # where the parietal bones meet the occipital bone


LANDMARKS = Landmarks()


@dataclass
class HeadTemplate:
    """Subject-independent maps on the template grid (all arrays (X, Y, Z) float32 unless stated).

    Attributes:
        gm, wm: grey / white matter probabilities of MNI152 2009a (0..1).
        csf: CSF fraction inside the cavity, 1 - gm - wm (0..1).
        cavity: intracranial (inside the inner table) fraction, smooth (0..1).
        depth_mm: distance inside the cavity from the inner table (mm; 0 outside).
        outside_mm: distance outside the cavity from the inner table (mm; 0 inside).
        ventricle: ventricular system (lateral, third, fourth) fraction (0..1).
        to_ventricle_mm: distance of brain voxels from the ventricles (mm).
        ventricle_depth_mm: distance of ventricle voxels from the ventricle wall (mm): shrinking erodes here.
        to_csf_mm: distance of brain tissue from the nearest CSF (mm): sulcal widening erodes from here.
        falx: bool, the falx cerebri, one voxel thick on the x = 0 plane.
        bone_texture: smooth noise (~N(0, 1)) for the diploe.
        thickness_mm: skull thickness of the average subject (mm), grown outward from the cavity.
        soft_hu: HU outside the cavity without the vault's skull: scalp, face, neck, sinus walls.
        air_cells: bool, air inside bone (sinuses, ethmoid and mastoid cells).
        coords: (3, X, Y, Z) MNI coordinates of every voxel (mm).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    cavity: np.ndarray
    depth_mm: np.ndarray
    outside_mm: np.ndarray
    ventricle: np.ndarray
    to_ventricle_mm: np.ndarray
    ventricle_depth_mm: np.ndarray
    to_csf_mm: np.ndarray
    falx: np.ndarray
    bone_texture: np.ndarray
    thickness_mm: np.ndarray
    soft_hu: np.ndarray
    air_cells: np.ndarray
    coords: np.ndarray


def _mni_folder() -> Path:
    """nilearn's packaged MNI152 2009a files, located without importing nilearn (a slow import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fmct synth needs nilearn (its MNI152 templates): pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _load_on_grid(name: str, coords: np.ndarray) -> np.ndarray:
    """Resample an MNI NIfTI (1 mm, uint8 0..255) onto the template grid as 0..1, trilinearly."""
    image = nib.load(_mni_folder() / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float32) / 255.0
    inverse = np.linalg.inv(image.affine)
    index = np.tensordot(inverse[:3, :3], coords, axes=1) + inverse[:3, 3, None, None, None]
    return ndimage.map_coordinates(data, index, order=1, cval=0.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def head_template() -> HeadTemplate:
    """Build (once per process) the subject-independent maps of the canonical head from MNI152 2009a."""
    axes = [ORIGIN_MM[d] + SPACING_MM * np.arange(SHAPE[d], dtype=np.float32) for d in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    t1 = _load_on_grid("t1", coords)
    gm = np.clip(_load_on_grid("gm", coords), 0, 1)
    wm = np.clip(_load_on_grid("wm", coords), 0, 1)

    # The T1 template is brain-extracted: its support is the brain with the CSF around it. Close it and
    # add 1.5 mm of subarachnoid space and dura to get the cavity inside the inner table.
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.03, iterations=3))
    cavity_mask = ndimage.binary_dilation(brain, iterations=1)
    cavity = np.clip(ndimage.gaussian_filter(cavity_mask.astype(np.float32), 0.7) * 2 - 0.5, 0, 1)
    depth_mm = ndimage.distance_transform_edt(cavity_mask).astype(np.float32) * SPACING_MM
    outside_mm = ndimage.distance_transform_edt(~cavity_mask).astype(np.float32) * SPACING_MM

    scale = np.clip(gm + wm, 1.0, None)  # the probabilities sometimes sum a little above 1
    gm, wm = gm / scale * cavity, wm / scale * cavity
    csf = np.clip(cavity - gm - wm, 0, 1)

    ventricle = _ventricles(csf, depth_mm, coords)
    tissue = (gm + wm) >= 0.5
    to_csf_mm = ndimage.distance_transform_edt(tissue).astype(np.float32) * SPACING_MM
    to_ventricle_mm = ndimage.distance_transform_edt(ventricle < 0.5).astype(np.float32) * SPACING_MM
    ventricle_depth_mm = ndimage.distance_transform_edt(ventricle >= 0.5).astype(np.float32) * SPACING_MM

    rng = np.random.default_rng(1234)  # the canonical head is the same in every process
    bone_texture = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 1.0)
    bone_texture /= bone_texture.std()
    thickness_mm = skull_thickness_mm(coords).astype(np.float32)
    soft_hu, air_cells = _extracranial(coords, outside_mm, thickness_mm)
    return HeadTemplate(
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf.astype(np.float32),
        cavity=cavity.astype(np.float32),
        depth_mm=depth_mm,
        outside_mm=outside_mm,
        ventricle=ventricle,
        to_ventricle_mm=to_ventricle_mm,
        ventricle_depth_mm=ventricle_depth_mm,
        to_csf_mm=to_csf_mm,
        falx=_falx(wm, csf, depth_mm, coords),
        bone_texture=bone_texture,
        thickness_mm=thickness_mm,
        soft_hu=soft_hu,
        air_cells=air_cells,
        coords=coords,
    )


def _ventricles(csf: np.ndarray, depth_mm: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Fraction of the ventricular system: deep CSF connected to the lateral ventricles, plus the 4th."""
    x, y, z = coords
    deep_csf = (csf > 0.55) & (depth_mm > 12)
    labels, n = ndimage.label(deep_csf)
    if n == 0:
        return np.zeros_like(csf)
    sizes = ndimage.sum_labels(deep_csf, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes * SPACING_MM**3 > 150  # mm^3: the lateral, third and fourth ventricles
    mask = keep[labels]
    # Deep CSF that is not ventricle: the basal cisterns below the third ventricle (except the fourth
    # ventricle) and the interhemispheric fissure above, in front of and behind the ventricles.
    cistern = (z < -8) & ~((np.abs(x) < 8) & (y < -30) & (y > -55) & (z > -48))
    fissure = ((np.abs(x) < 3.5) & ((z > 16) | (y > 25) | ((y < -38) & (z > -8)))) | (z > 34)
    mask &= ~(cistern | fissure)
    mask = ndimage.binary_dilation(mask, iterations=1) & (csf > 0.35)
    return (mask * csf).astype(np.float32)


def _falx(wm: np.ndarray, csf: np.ndarray, depth_mm: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The falx: the midline plane of the interhemispheric fissure, above the corpus callosum."""
    x0 = int(round(-ORIGIN_MM[0] / SPACING_MM))
    mid_wm = wm[x0] > 0.5  # (Y, Z): the corpus callosum is the white matter crossing the midline
    z_axis = coords[2, 0, 0, :]
    has_callosum = mid_wm.any(axis=1)
    top = np.where(has_callosum, z_axis[np.argmax(np.where(mid_wm, z_axis, -1e9), axis=1)], np.nan)
    ys = np.flatnonzero(has_callosum)
    if ys.size:
        # In front of and behind the callosum the falx reaches lower: hold the callosum's end heights.
        top[: ys[0]] = top[ys[0]]
        top[ys[-1] + 1 :] = top[ys[-1]]
    lower_edge = np.nan_to_num(top, nan=0.0) + 6.0
    falx = np.zeros(wm.shape, dtype=bool)
    falx[x0] = (z_axis[None, :] > lower_edge[:, None]) & (depth_mm[x0] > 0)
    return falx


@dataclass
class HeadParams:
    """One subject's anatomy parameters (all HU or mm).

    Attributes:
        gm_hu, wm_hu, csf_hu: tissue densities.
        sulcal_widening_mm: tissue within this distance of CSF becomes CSF (atrophy; 0 = none).
        ventricle_dilation_mm: ventricles grow by this distance (negative shrinks them).
        sulcal_effacement: 0..1, fraction of sulcal CSF replaced by grey matter (raised pressure).
        skull_scale: multiplies the skull thickness everywhere.
        calcify_pineal, calcify_choroid: add the physiological calcifications.
    """

    gm_hu: float = 38.0
    wm_hu: float = 27.0
    csf_hu: float = 6.0
    sulcal_widening_mm: float = 0.0
    ventricle_dilation_mm: float = 0.0
    sulcal_effacement: float = 0.0
    skull_scale: float = 1.0
    calcify_pineal: bool = False
    calcify_choroid: bool = False


@dataclass
class Tissues:
    """One subject's tissue fractions in the template frame (float32 (X, Y, Z), 0..1)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricle: np.ndarray
    sulcal_loss: np.ndarray  # brain tissue turned to CSF by sulcal widening
    ventricular_loss: np.ndarray  # brain tissue turned to CSF by ventricular enlargement


def brain_tissues(template: HeadTemplate, params: HeadParams) -> Tissues:
    """Tissue fractions after the subject's sulcal widening, ventricular dilation and effacement."""
    ramp = 1.0 / SPACING_MM  # soft edges one voxel wide keep the partial volume of the template
    widened = np.clip((params.sulcal_widening_mm - template.to_csf_mm) * ramp + 0.5, 0, 1)
    widened *= (params.sulcal_widening_mm > 0) * template.cavity
    dilation = params.ventricle_dilation_mm
    if dilation >= 0:
        grown = np.clip((dilation - template.to_ventricle_mm) * ramp + 0.5, 0, 1) * (dilation > 0)
        ventricle = np.maximum(template.ventricle, grown * template.cavity)
    else:
        ventricle = template.ventricle * np.clip((dilation + template.ventricle_depth_mm) * ramp + 0.5, 0, 1)
    sulcal_csf = (template.csf - template.ventricle) * (1 - params.sulcal_effacement)
    csf = np.clip(np.maximum(np.maximum(sulcal_csf + ventricle, widened), 0), 0, template.cavity)
    tissue_old = np.maximum(template.gm + template.wm, 1e-6)
    tissue_new = np.clip(template.cavity - csf, 0, None)
    gm = template.gm * tissue_new / tissue_old
    wm = template.wm * tissue_new / tissue_old
    lost = np.clip(tissue_old - tissue_new, 0, 1) * (template.gm + template.wm > 0.05)
    from_ventricles = np.clip(ventricle - template.ventricle, 0, 1)
    ventricular = lost * (from_ventricles > widened)
    return Tissues(
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        csf=csf.astype(np.float32),
        ventricle=ventricle.astype(np.float32),
        sulcal_loss=(lost - ventricular).astype(np.float32),
        ventricular_loss=ventricular.astype(np.float32),
    )


def skull_thickness_mm(coords: np.ndarray) -> np.ndarray:
    """Thickness (mm) of the skull grown outward from the cavity: thin temporal squama, thick base."""
    x, y, z = coords
    base = 6.0 + 2.0 * np.clip((-25.0 - z) / 25.0, 0, 1)
    # Petrous ridges and the floor of the middle cranial fossa, between the temporal lobes and cerebellum.
    petrous = 9.0 * np.exp(-(((np.abs(x) - 35) / 18) ** 2 + ((y + 22) / 16) ** 2 + ((z + 42) / 12) ** 2))
    clivus = 8.0 * np.exp(-((x / 12) ** 2 + ((y + 12) / 14) ** 2 + ((z + 50) / 16) ** 2))
    temporal = 2.5 * np.exp(-(((np.abs(x) - 65) / 12) ** 2 + ((y + 10) / 30) ** 2 + ((z + 5) / 20) ** 2))
    occipital = 3.0 * np.exp(-(((y + 100) / 15) ** 2 + ((z + 10) / 20) ** 2 + (x / 20) ** 2))
    glabella = 6.0 * np.exp(-((x / 22) ** 2 + ((y - 70) / 12) ** 2 + ((z - 2) / 16) ** 2))
    return base + petrous + clivus - temporal + occipital + glabella


def _ellipsoid(coords: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) around ``centre`` with semi-axes in mm."""
    return np.sqrt(sum(((coords[d] - centre[d]) / semi_axes[d]) ** 2 for d in range(3)))


def _mirrored(coords: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Ellipsoidal radius of a pair of structures mirrored across the midline (minimum of both)."""
    right = _ellipsoid(coords, centre, semi_axes)
    left = _ellipsoid(coords, (-centre[0], centre[1], centre[2]), semi_axes)
    return np.minimum(right, left)


def _extracranial(template_coords: np.ndarray, outside_mm: np.ndarray, thickness_mm: np.ndarray):
    """Subject-independent HU outside the cavity, ignoring the vault's skull, and the air cells.

    Returns ``(soft_hu, air_cells)``: soft tissue of scalp, face and neck with the orbits, globes,
    bony sinus walls and the cervical canal (float32 HU), and the bool mask of air inside bone.
    """
    lm = LANDMARKS
    coords = template_coords
    x, y, z = coords
    d = outside_mm
    rng = np.random.default_rng(99)
    texture = ndimage.gaussian_filter(rng.standard_normal(d.shape).astype(np.float32), 1.0)
    texture /= texture.std()

    frontal = _ellipsoid(coords, lm.frontal_sinus, (15, 6, 11))
    sphenoid = _ellipsoid(coords, lm.sphenoid_sinus, (14, 11, 9))
    ethmoid = _ellipsoid(coords, lm.ethmoid_cells, (11, 20, 12))
    mastoid = _mirrored(coords, lm.mastoid, (11, 13, 12))
    maxillary = _mirrored(coords, (27, 52, -68), (13, 17, 15))
    nasal = _ellipsoid(coords, (0, 58, -66), (9, 26, 16))
    honeycomb = texture > -0.3
    air = (frontal < 1) | (sphenoid < 1) | (maxillary < 1) | (nasal < 1)
    air |= ((ethmoid < 1) | (mastoid < 1)) & honeycomb
    air &= ~((np.abs(x) < 1.0) & (nasal < 1))  # the nasal septum
    sinus_wall = (frontal < 1.35) | (sphenoid < 1.35) | (ethmoid < 1.25) | (mastoid < 1.25)
    sinus_wall |= (maxillary < 1.2) | (nasal < 1.15)

    face = _ellipsoid(coords, (0, 52, -52), (58, 42, 42)) < 1
    neck = (_ellipsoid(coords, (0, -28, -95), (58, 62, 60)) < 1) & (z < -40)
    globes = _mirrored(coords, lm.globe_centre, (lm.globe_radius_mm,) * 3)
    orbit = _mirrored(coords, (30, 38, -36), (16, 30, 15))  # the cone behind the globe, filled with fat
    orbit_wall = (orbit >= 1) & (orbit < 1.18) & (z < -22)
    scalp_mm = 6.0
    vault_surface = thickness_mm + scalp_mm
    body = (d < vault_surface) | face | neck

    fat_layer = np.exp(-(((d - thickness_mm - 0.55 * scalp_mm) / (0.22 * scalp_mm)) ** 2))
    temporalis = np.exp(-(((np.abs(x) - 62) / 12) ** 2 + (y / 35) ** 2 + ((z - 5) / 28) ** 2))
    soft = 42.0 - 130.0 * fat_layer * (1 - temporalis)
    soft = np.where(orbit < 1, -85.0, soft)
    soft = np.where(globes < 1, 12.0, soft)
    soft = np.where((globes < 1.08) & (globes >= 1), 45.0, soft)  # sclera
    soft = np.where((sinus_wall | orbit_wall) & body, 1100.0 + 150.0 * texture, soft)
    # The cervical canal below the foramen magnum: cord in CSF inside the ring of the atlas.
    canal_r = np.hypot(x, y + 44)
    below_foramen = z < -66
    soft = np.where(below_foramen & (canal_r >= 10) & (canal_r < 15) & (z > -84), 900.0, soft)
    soft = np.where(below_foramen & (canal_r < 10), np.where(canal_r < 6, 32.0, 8.0), soft)
    # The skin edge: one voxel of partial volume with air over the vault.
    skin = np.clip((vault_surface - d) / SPACING_MM + 0.5, 0, 1)
    soft = np.where(face | neck, soft, skin * soft + (1 - skin) * AIR_HU)
    soft = np.where(body | (skin > 0), soft, AIR_HU)
    air_cells = air & ((d < thickness_mm) | sinus_wall)
    # The skull must not close the foramen magnum around the cord.
    thickness_mm[below_foramen & (canal_r < 15)] = 0.0
    return soft.astype(np.float32), air_cells


def render_head(template: HeadTemplate, params: HeadParams, tissues: Tissues) -> np.ndarray:
    """The subject's HU volume in the template frame (float32 (X, Y, Z)), before pathologies and pose.

    Brain from the tissue fractions with the falx; the vault's skull (inner and outer tables with
    diploe) grown outward from the cavity to the subject's thickness; the precomputed scalp, face, neck,
    sinus and mastoid air; optional pineal and choroid plexus calcifications.
    """
    brain = tissues.gm * params.gm_hu + tissues.wm * params.wm_hu + tissues.csf * params.csf_hu
    brain += np.where(template.falx, 30.0, 0.0)  # dura is denser than CSF, partial volume of one voxel

    thickness = template.thickness_mm * params.skull_scale
    d = template.outside_mm
    table_mm = np.clip(0.28 * thickness, 1.5, 3.0)
    diploe = (d > table_mm) & (d < thickness - table_mm)
    bone = np.where(diploe, 700.0 + 150.0 * template.bone_texture, 1500.0)
    skull_edge = np.clip((thickness - d) / SPACING_MM + 0.5, 0, 1)  # one voxel of partial volume
    extracranial = skull_edge * bone + (1 - skull_edge) * template.soft_hu
    extracranial = np.where(template.air_cells, AIR_HU, extracranial)

    hu = template.cavity * brain + (1 - template.cavity) * extracranial
    coords = template.coords
    if params.calcify_pineal:
        hu = np.where(_ellipsoid(coords, LANDMARKS.pineal, (2.5, 3.0, 2.5)) < 1, 180.0, hu)
    if params.calcify_choroid:
        hu = np.where(_mirrored(coords, LANDMARKS.choroid_glomus, (3.0, 4.0, 3.0)) < 1, 140.0, hu)
    return hu.astype(np.float32)

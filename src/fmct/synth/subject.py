"""One synthetic subject: anatomy, pathologies, placement in the scanner, and its reconstructed series.

Frames (all RAS mm): the *template* frame of the canonical head (MNI), the *head* frame of this subject
(the template scaled and smoothly deformed, then pushed by mass effect), and the *world* frame of the
scanner (the head rotated and translated on the headrest). A :class:`Subject` is drawn from
``(seed, site)``; :meth:`Subject.scan` reconstructs any number of series of it (routine, thin, bone),
which is how a study with several series is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from fmct.io.volume import Volume
from fmct.synth import pathology
from fmct.synth.acquisition import Acquisition, ScannerGrid, paint_table, reconstruct, reconstruct_bits
from fmct.synth.anatomy import AIR_HU, ORIGIN_MM, SPACING_MM, HeadParams, brain_tissues, head_template, render_head
from fmct.synth.pathology import BITS, FINDINGS, HAEMORRHAGES, Canvas, Lesion, Push
from fmct.synth.sites import SITES, SiteProfile

PRIMARY_FINDINGS = ("iph", "ivh", "sdh", "edh", "sah", "infarct", "hydrocephalus", "atrophy", "mass", "fracture")
MIDLINE_SHIFT_MM = 5.0  # a shift of the falx beyond this is labelled midline_shift
ROTATION_CENTRE_MM = np.array([0.0, -18.0, 10.0])  # the head turns about its middle on the headrest
SERIES = ("routine", "thin", "bone")


@dataclass
class SyntheticScan:
    """One reconstructed series with its ground truth.

    Attributes:
        hu: float32 (I, J, K) HU, axes as :class:`fmct.io.Volume` (I along a row, J down the columns,
            K across slices); the DICOM pixel_array of slice k is ``hu[:, :, k].T``.
        affine: 4x4 RAS voxel -> world mm (sheared for a gantry tilt).
        bits: uint16 (I, J, K) label bits (``pathology.BITS``): the voxel masks of every finding and the falx.
        labels: 0/1 per finding name of ``FINDINGS``; 1 exactly when that finding's mask has voxels.
        acquisition: how the series was reconstructed.
        head_from_world: 4x4 world mm -> head frame mm (x = 0 is this subject's undisplaced midline).
        info: facts for the tables and the tests: site, age, sex, series, midline_shift_mm (the falx's
            largest displacement predicted from the mass effect), lesion volumes (ml) and subtypes.
    """

    hu: np.ndarray
    affine: np.ndarray
    bits: np.ndarray
    labels: dict
    acquisition: Acquisition
    head_from_world: np.ndarray
    info: dict = field(default_factory=dict)

    def mask(self, name: str) -> np.ndarray:
        """Bool (I, J, K) voxel mask of a finding or structure (``"sdh"``, ``"falx"``, ...)."""
        return (self.bits & BITS[name]) != 0

    def volume(self) -> Volume:
        """The series as a :class:`fmct.io.Volume` (float32 HU, RAS affine, acquisition metadata)."""
        acq = self.acquisition
        metadata = {
            "kernel": acq.kernel_name,
            "slice_thickness_mm": acq.thickness_mm,
            "pixel_spacing_mm": [acq.pixel_mm, acq.pixel_mm],
            "site": self.info.get("site", ""),
        }
        return Volume(hu=self.hu, affine=self.affine, metadata=metadata, source=f"synth:{self.info.get('seed', '')}")


def _rotation(pitch_deg: float, roll_deg: float, yaw_deg: float) -> np.ndarray:
    """Rotation about x (nodding), then y (tilting to a shoulder), then z (turning)."""
    p, r, y = np.radians([pitch_deg, roll_deg, yaw_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Deformation:
    """A smooth displacement (mm) of the template, symmetric so that the midline plane x = 0 stays put.

    ``d_x`` is x times a slowly varying field (odd in x), ``d_y`` and ``d_z`` depend on x through
    cos(x / 35 mm) (even in x).
    """

    stretch: np.ndarray  # (2,) relative lateral stretch amplitudes
    shift_mm: np.ndarray  # (4,) amplitudes of the y and z displacement terms
    phases: np.ndarray  # (9,) radians

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Deformation":
        return cls(rng.uniform(-0.04, 0.04, 2), rng.uniform(-3.0, 3.0, 4), rng.uniform(0, 2 * np.pi, 9))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The displacement (d_x, d_y, d_z) in mm at template positions (x, y, z) in mm."""
        a, b, f = self.stretch, self.shift_mm, self.phases
        even = np.cos(x / 35.0)
        d_x = x * (a[0] * np.cos(y / 45.0 + f[0]) * np.cos(z / 40.0 + f[1]) + a[1] * np.cos(y / 25.0 + f[2]))
        d_y = b[0] * even * np.sin(y / 40.0 + f[3]) * np.cos(z / 50.0 + f[4]) + b[1] * np.sin(z / 30.0 + f[5])
        d_z = b[2] * even * np.sin(z / 40.0 + f[6]) * np.cos(y / 50.0 + f[7]) + b[3] * np.sin(y / 35.0 + f[8])
        return d_x, d_y, d_z


def _upsample_twice(array: np.ndarray, axis: int, combine) -> np.ndarray:
    """Double the sampling along ``axis`` (n samples -> 2n - 1); new samples ``combine`` their neighbours.

    ``np.add`` gives linear interpolation (the sum is halved), ``np.logical_or`` a conservative mask.
    """
    array = np.moveaxis(array, axis, 0)
    out = np.empty((2 * array.shape[0] - 1,) + array.shape[1:], dtype=array.dtype)
    out[0::2] = array
    between = combine(array[:-1], array[1:])
    out[1::2] = between * np.float32(0.5) if combine is np.add else between
    return np.moveaxis(out, 0, axis)


def push_x(pushes: list[Push], scale: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Lateral mass-effect displacement (mm) at head-frame positions (x, y, z) (mm), summed over lesions.

    Full on the lesion's side, fading to zero across the opposite hemisphere and at the inner table
    (the falx's attachment to the vault does not move; its free lower edge does).
    """
    total = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
    if not pushes:
        return total
    semi = pathology.CAVITY_SEMI_AXES_MM * scale
    centre = pathology.CAVITY_CENTRE_MM * scale
    radius = np.sqrt(
        ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    )
    anchor = np.clip((1 - radius) * semi.mean() / 15.0, 0, 1)
    for push in pushes:
        c = np.asarray(push.centre_mm) * scale
        bump = np.exp(-((y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * push.width_mm**2))
        across = np.clip(1 + push.side * x / 60.0, 0, 1) if push.side else 1.0  # decays on the far side
        total += (-push.side * push.amplitude_mm) * bump * across * anchor
    return total


class Subject:
    """A synthetic patient drawn from ``(seed, site)``: anatomy, findings, pose, and the study's protocol.

    Args:
        seed: any int; equal seeds give identical subjects and series.
        site: a site name of ``SITES`` or a :class:`SiteProfile`.
        findings: exactly these primary findings (names of ``PRIMARY_FINDINGS``) instead of drawing them
            from the site's prevalences; ``()`` is a normal scan.
        severity: 0 (subtle) .. 1 (obvious) for every finding instead of a random draw.
    """

    def __init__(self, seed: int, site: str | SiteProfile = "A", findings=None, severity: float | None = None):
        self.seed = int(seed)
        self.site = SITES[site] if isinstance(site, str) else site
        rng = np.random.default_rng([self.seed, 0])
        site = self.site
        self.age = float(np.clip(rng.normal(site.age_mean, site.age_sd), 18, 95))
        self.sex = str(rng.choice(["F", "M"]))
        self.findings = self._draw_findings(rng) if findings is None else tuple(findings)
        unknown = sorted(set(self.findings) - set(PRIMARY_FINDINGS))
        if unknown:
            raise ValueError(f"unknown finding {unknown[0]!r}; primary findings are {', '.join(PRIMARY_FINDINGS)}")
        self.severity = {f: (rng.uniform() if severity is None else severity) for f in PRIMARY_FINDINGS}
        self.params = self._draw_head(rng)
        size = rng.normal(1.0 + (0.03 if self.sex == "M" else -0.02), 0.035)
        self.scale = (size * rng.uniform(0.96, 1.04, 3)).astype(np.float32)
        self.deformation = Deformation.draw(rng)
        self.rotation = _rotation(rng.normal(0, 6), rng.normal(0, 3), rng.normal(0, 4))
        self.translation = np.array([rng.normal(0, 6), rng.normal(0, 8), rng.uniform(-60, 60)])
        self.hu, self.bits, self.lesions = self._paint(np.random.default_rng([self.seed, 1]))
        self.pushes = [lesion.push for lesion in self.lesions if lesion.push is not None]
        self.body = self.hu > -990  # where the template-frame head is not air

    # ------------------------------------------------------------------------------------ drawing
    def _draw_findings(self, rng: np.random.Generator) -> tuple[str, ...]:
        present = [f for f, p in self.site.prevalence.items() if rng.random() < p]
        # Atrophy follows age: rare before 55, common after 75.
        if rng.random() < 0.85 / (1 + np.exp(-(self.age - 70) / 7)):
            present.append("atrophy")
        if "edh" in present and "fracture" not in present and rng.random() < 0.7:
            present.append("fracture")  # most epidural haematomas lie under a fracture
        return tuple(f for f in PRIMARY_FINDINGS if f in present)

    def _draw_head(self, rng: np.random.Generator) -> HeadParams:
        ageing = np.clip((self.age - 40) / 50, 0, 1)
        ventricles = rng.uniform(-1.5, 0.0)  # normal variation never adds voxels to a finding's mask
        widening, effacement = 0.0, rng.uniform(0.0, 0.3)
        if "atrophy" in self.findings:
            widening = 0.6 + 2.4 * self.severity["atrophy"]
            ventricles = 0.5 + 2.5 * self.severity["atrophy"]
            effacement = 0.0
        if "hydrocephalus" in self.findings:
            ventricles = 2.5 + 6.5 * self.severity["hydrocephalus"]
            effacement = rng.uniform(0.5, 0.9)
        return HeadParams(
            gm_hu=rng.normal(39.0 - 2.0 * ageing, 1.2),
            wm_hu=rng.normal(27.5 - 0.5 * ageing, 1.0),
            csf_hu=rng.normal(6.0, 1.5),
            sulcal_widening_mm=widening,
            ventricle_dilation_mm=ventricles,
            sulcal_effacement=effacement if "atrophy" not in self.findings else 0.0,
            skull_scale=rng.uniform(0.8, 1.25),
            calcify_pineal=bool(rng.random() < 0.2 + 0.6 * ageing),
            calcify_choroid=bool(rng.random() < 0.1 + 0.6 * ageing),
        )

    def _paint(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
        """HU and label bits of this subject in the template frame, with every finding painted."""
        template = head_template()
        tissues = brain_tissues(template, self.params)
        hu = render_head(template, self.params, tissues)
        bits = np.where(template.falx, np.uint16(BITS["falx"]), np.uint16(0))
        if "atrophy" in self.findings:
            bits[tissues.sulcal_loss > 0.5] |= BITS["atrophy"]
        if "hydrocephalus" in self.findings:
            bits[tissues.ventricular_loss > 0.5] |= BITS["hydrocephalus"]
        elif "atrophy" in self.findings:
            bits[tissues.ventricular_loss > 0.5] |= BITS["atrophy"]  # ex-vacuo ventricular enlargement
        canvas = Canvas(hu=hu, bits=bits, tissues=tissues, template=template, blood_hu=rng.normal(66, 4))
        severity = self.severity
        lesions: list[Lesion] = []
        for finding in ("infarct", "mass", "sah", "edh", "sdh", "iph", "ivh"):
            if finding not in self.findings:
                continue
            if finding in ("edh", "sdh"):
                lesions.append(pathology.extra_axial(canvas, rng, severity[finding], finding))
            elif finding == "iph":
                lesions.append(pathology.intraparenchymal(canvas, rng, severity[finding]))
            elif finding == "ivh":
                lesions.append(pathology.intraventricular(canvas, rng, severity[finding]))
            elif finding == "sah":
                lesions.append(pathology.subarachnoid(canvas, rng, severity[finding]))
            elif finding == "infarct":
                lesions.append(pathology.infarct(canvas, rng, severity[finding], self.params.wm_hu))
            elif finding == "mass":
                lesions.append(pathology.mass(canvas, rng, severity[finding]))
        if "fracture" in self.findings:
            edh = [lesion for lesion in lesions if lesion.finding == "edh"]
            near = None
            if edh:
                near = template.coords[:, (bits & BITS["edh"]) != 0].mean(axis=1)
            lesions.append(pathology.fracture(canvas, rng, severity["fracture"], near))
        pathology.beam_hardening(canvas, rng, self.site.beam_hardening * rng.uniform(0.6, 1.4))
        haemorrhage = np.uint16(sum(BITS[f] for f in HAEMORRHAGES))
        bits[(bits & haemorrhage) != 0] |= BITS["ich"]
        return canvas.hu, canvas.bits, lesions

    # -------------------------------------------------------------------------------- placement
    def to_head(self, template_mm: np.ndarray) -> np.ndarray:
        """Head-frame positions (mm) of template positions (3, ...) before mass effect."""
        d = self.deformation(*template_mm)
        return np.stack([(template_mm[i] + d[i]) * self.scale[i] for i in range(3)])

    def world_from_head(self) -> np.ndarray:
        """4x4 head frame -> scanner world (mm): the pose on the headrest."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.rotation
        matrix[:3, 3] = self.translation - self.rotation @ ROTATION_CENTRE_MM
        return matrix

    def acquisition(self, series: str = "routine", matrix: int = 512) -> Acquisition:
        """The site's protocol for this study: ``"routine"`` (soft, routine thickness), ``"thin"`` (soft,
        thin) or ``"bone"`` (sharp kernel, routine thickness); field of view, tilt and coverage are shared."""
        if series not in SERIES:
            raise ValueError(f"unknown series {series!r} (one of {', '.join(SERIES)})")
        site = self.site
        rng = np.random.default_rng([self.seed, 2])
        fov = rng.uniform(*site.fov_mm)
        tilt = (
            rng.uniform(0.3, 1.0) * site.max_tilt_deg * rng.choice([-1, 1])
            if rng.random() < site.tilt_probability
            else 0.0
        )
        world = self.world_from_head()
        # Coverage: from below the foramen magnum to above the vertex, along the table.
        top = world[:3, :3] @ self.to_head(np.array([[0.0], [-20.0], [98.0]]))[:, 0] + world[:3, 3]
        base = world[:3, :3] @ self.to_head(np.array([[0.0], [-40.0], [-78.0]]))[:, 0] + world[:3, 3]
        z_low, z_high = base[2] - rng.uniform(0, 8), top[2] + rng.uniform(0, 6)
        if rng.random() < site.partial_coverage_probability:
            if rng.random() < 0.5:
                z_high -= rng.uniform(10, 40)  # misses the vertex
            else:
                z_low += rng.uniform(10, 40)  # misses the skull base
        thickness = site.thin_mm if series == "thin" else site.thickness_mm
        n_slices = int(np.floor((z_high - z_low) / thickness)) + 1
        centre = (float(self.translation[0] + rng.normal(0, 5)), float(self.translation[1] + rng.normal(-10, 6)))
        noise = site.noise_hu * np.sqrt(site.thickness_mm / thickness) * (2.5 if series == "bone" else 1.0)
        return Acquisition(
            matrix=matrix,
            fov_mm=float(fov),
            thickness_mm=float(thickness),
            z_first_mm=float(z_low),
            n_slices=n_slices,
            centre_mm=centre,
            tilt_deg=float(tilt),
            kernel="sharp" if series == "bone" else "soft",
            kernel_name=site.sharp_kernel if series == "bone" else site.soft_kernel,
            noise_hu=float(noise * rng.uniform(0.85, 1.15)),
            hu_offset=site.hu_offset,
        )

    def scan(self, acquisition: Acquisition, series: str = "routine") -> SyntheticScan:
        """Reconstruct one series of this subject: warp onto the scanner grid, then slices, kernel, noise."""
        grid = ScannerGrid.for_acquisition(acquisition)
        origin, steps = grid.axes_to_world()
        head_from_world = np.linalg.inv(self.world_from_head())
        # Head-frame position of grid index (a, b, c): affine, so evaluated as broadcast 1D terms.
        step_head = (head_from_world[:3, :3] @ steps).astype(np.float32)
        origin_head = (head_from_world[:3, :3] @ origin + head_from_world[:3, 3]).astype(np.float32)
        box = self._head_box(grid, origin_head, step_head)
        hu_grid = np.full(grid.shape, AIR_HU, dtype=np.float32)
        bits_grid = np.zeros(grid.shape, dtype=np.uint16)
        if box is not None:
            template_index, body = self._pull_back(box, origin_head, step_head)
            hu_grid[box][body] = ndimage.map_coordinates(self.hu, template_index, order=1, cval=AIR_HU, prefilter=False)
            bits_grid[box][body] = ndimage.map_coordinates(self.bits, template_index, order=0, cval=0, prefilter=False)
        back_y, head_z = self._back_of_head(grid, hu_grid)
        paint_table(grid, hu_grid, back_y, head_z)

        self._mark_midline_shift(bits_grid, origin, steps, head_from_world)
        rng = np.random.default_rng([self.seed, 3, SERIES.index(series)])
        hu = reconstruct(grid, hu_grid, rng)
        bits = reconstruct_bits(grid, bits_grid)
        present = int(np.bitwise_or.reduce(bits, axis=None))
        labels = {name: int(bool(present & BITS[name])) for name in FINDINGS}
        info = self._info(acquisition, series)
        return SyntheticScan(hu, acquisition.affine(), bits, labels, acquisition, head_from_world, info)

    def _pull_back(self, box, origin_head: np.ndarray, step_head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Template-grid indices (3, N) of the scanner-grid voxels of ``box`` that can hold the head, and
        the bool mask (box shape) of those voxels; the others are air.

        Mass effect and deformation are smooth over centimetres, so the map is evaluated on every
        second voxel and interpolated linearly (exact for the pose and scaling, which are affine).
        """
        sizes = [s.stop - s.start for s in box]
        coarse = [np.arange(s.start, s.start + 2 * (n // 2 + 1), 2, dtype=np.float32) for s, n in zip(box, sizes)]
        a, b, c = coarse[0][:, None, None], coarse[1][None, :, None], coarse[2][None, None, :]
        head = [origin_head[d] + step_head[d, 0] * a + step_head[d, 1] * b + step_head[d, 2] * c for d in range(3)]
        head[0] = head[0] - push_x(self.pushes, self.scale, *head)
        scaled = [head[d] / self.scale[d] for d in range(3)]
        shift = self.deformation(*scaled)
        index = np.stack([(scaled[d] - shift[d] - np.float32(ORIGIN_MM[d])) / np.float32(SPACING_MM) for d in range(3)])
        body = ndimage.map_coordinates(self.body, index, order=0, cval=0, prefilter=False)
        body = ndimage.binary_dilation(body, iterations=1)
        for axis in (0, 1, 2):
            body = _upsample_twice(body, axis, np.logical_or)
            index = _upsample_twice(index, axis + 1, np.add)
        crop = (slice(0, sizes[0]), slice(0, sizes[1]), slice(0, sizes[2]))
        body = body[crop]
        return index[(slice(None),) + crop][:, body], body

    def _head_box(self, grid: ScannerGrid, origin_head: np.ndarray, step_head: np.ndarray):
        """Index box of the scanner grid that can hold the head (a margin covers the deformation)."""
        corners = np.array(np.meshgrid([-86.0, 86.0], [-122.0, 95.0], [-88.0, 98.0], indexing="ij")).reshape(3, -1)
        head = corners * self.scale[:, None] * 1.03 + 4.0 * np.sign(corners)
        index = np.linalg.solve(step_head, head - origin_head[:, None])
        lo = np.maximum(np.floor(index.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.ceil(index.max(axis=1)).astype(int) + 1, grid.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(low), int(high)) for low, high in zip(lo, hi))

    def _back_of_head(self, grid: ScannerGrid, hu_grid: np.ndarray) -> tuple[float, tuple[float, float]]:
        """World y (mm) of the most posterior skin, and the z range (mm) of the head, for the headrest."""
        origin, steps = grid.axes_to_world()
        body = hu_grid > -500
        a, b, c = np.nonzero(body[::2, ::2, ::2])
        if a.size == 0:
            return float(origin[1] + steps[1, 1] * grid.shape[1]), (0.0, 0.0)
        points = origin[:, None] + steps @ (2 * np.stack([a, b, c]).astype(np.float64))
        return float(points[1].min()), (float(points[2].min()), float(points[2].max()))

    def _mark_midline_shift(
        self, bits: np.ndarray, origin: np.ndarray, steps: np.ndarray, head_from_world: np.ndarray
    ) -> None:
        """Set the midline_shift bit on scanner-grid falx voxels more than 5 mm off the head's midline."""
        falx = np.nonzero(bits & BITS["falx"])
        if falx[0].size == 0:
            return
        world = origin[:, None] + steps @ np.stack(falx).astype(np.float64)
        head_x = head_from_world[0, :3] @ world + head_from_world[0, 3]
        shifted = np.abs(head_x) > MIDLINE_SHIFT_MM
        bits[tuple(axis[shifted] for axis in falx)] |= BITS["midline_shift"]

    def predicted_midline_shift_mm(self, acquisition: Acquisition) -> float:
        """Largest lateral displacement (mm) of the falx within the scanned slab, from the mass effect."""
        if not self.pushes:
            return 0.0
        template = head_template()
        falx = template.coords[:, template.falx]
        head = self.to_head(falx)
        world = self.world_from_head()
        z = world[2, :3] @ head + world[2, 3]
        half = acquisition.thickness_mm / 2
        z_last = acquisition.z_first_mm + (acquisition.n_slices - 1) * acquisition.thickness_mm
        covered = (z >= acquisition.z_first_mm - half) & (z <= z_last + half)
        if not covered.any():
            return 0.0
        # The pushed falx position x solves x - push(x) = 0: a fixed point, reached in a few steps.
        x = np.zeros(int(covered.sum()), dtype=np.float64)
        y, zz = head[1, covered], head[2, covered]
        for _ in range(8):
            x = push_x(self.pushes, self.scale, x, y, zz).astype(np.float64)
        return float(np.abs(x).max())

    def _info(self, acquisition: Acquisition, series: str) -> dict:
        return {
            "seed": self.seed,
            "site": self.site.name,
            "age": round(self.age, 1),
            "sex": self.sex,
            "series": series,
            "findings": list(self.findings),
            "midline_shift_mm": round(self.predicted_midline_shift_mm(acquisition), 2),
            "lesions": [
                {
                    "finding": lesion.finding,
                    "volume_ml": round(lesion.volume_ml, 2),
                    "side": lesion.side,
                    "subtype": lesion.subtype,
                }
                for lesion in self.lesions
            ],
        }


def make_subject(
    seed: int, site: str = "A", findings=None, severity: float | None = None, series: str = "routine", matrix: int = 512
) -> SyntheticScan:
    """One synthetic head CT series in memory: HU volume, geometry, voxel masks and labels.

    Args:
        seed: equal seeds give identical scans.
        site: site profile name (``"A"``, ``"B"``, ``"C"``).
        findings: force these primary findings (``()`` = normal); None draws them from the site.
        severity: force every finding's size, 0 (subtle) .. 1 (obvious); None draws it.
        series: ``"routine"``, ``"thin"`` or ``"bone"``.
        matrix: pixels per image side (512 clinically; smaller for quick tests, same field of view).

    Returns:
        A :class:`SyntheticScan` (``hu`` float32 (I, J, K) HU, ``affine`` RAS mm, ``bits``, ``labels``).
    """
    subject = Subject(seed, site, findings, severity)
    return subject.scan(subject.acquisition(series, matrix), series)

"""The five planning styles of the synthetic data, in one table (see docs/synthetic_data.md).

A style is a named set of optimization weights and beam settings; the anatomy never depends
on it. Doses inside the optimizer are in units of the prescription (1.0 = Rx). Every OAR
objective acts on the OAR minus the PTV, as clinical optimization structures do.

Style intent (Kandalan et al. 2020, Table 1 and sections 2.1, 4):
- source: conformal VMAT, a normal-tissue objective (NTO) shapes the fall-off; a hot PTV core
  (coverage dome up to 103 %, PTV D2 ~105 %), as Eclipse plans often have.
- internal_a: source with the rectum spared more aggressively (rectum weight up, femoral heads
  held at source's dose by their own weight).
- internal_b: rectum and bladder spared more aggressively (higher weights, an arc avoiding
  anterior entry through the bladder), NTO softer; femoral heads held at source's dose.
- internal_c: NTO off; femoral heads unconstrained to lower bladder and rectum dose.
- external: another institution's system (Erasmus-iCycle): a fixed 23-beam starting condition;
  the anterior and two lateral beams carry 2.2x the MU of the other 20 (the same directions
  for every patient, so the spikes are learnable from the anatomy), which make an arc-like
  low-dose bath; no NTO; a flat PTV dose (D2 <= ~102 %).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Planning convention shared by every style: 70 Gy in 28 fractions of 2.5 Gy (moderate
# hypofractionation), normalized so the PTV D95 equals the prescription.
PRESCRIPTION_GY = 70.0
FRACTIONS = 28
# (training, test) plans per style: the paper's Table 1.
PAPER_SPLITS = {"source": (108, 10), "internal_a": (29, 5), "internal_b": (14, 2), "internal_c": (17, 3), "external": (20, 40)}

# VMAT arcs are modelled as static control points this far apart (two full arcs' worth of
# directions, 10 degrees apart, like a coarse TPS arc sampling).
ARC_CONTROL_POINTS = 36
EXTERNAL_BEAMS = 23  # the Erasmus-iCycle starting condition of the paper


def arc(n: int = ARC_CONTROL_POINTS, avoid: tuple[float, float] | None = None) -> tuple[float, ...]:
    """Control-point gantry angles of a full arc, less an avoidance sector (centre, half-width)."""
    angles = np.arange(n) * 360.0 / n
    if avoid is not None:
        off = np.abs((angles - avoid[0] + 180.0) % 360.0 - 180.0)
        angles = angles[off > avoid[1]]
    return tuple(float(a) for a in angles)


@dataclasses.dataclass(frozen=True)
class Style:
    """Objective weights (dimensionless, relative) and beam settings of one planning style."""

    name: str
    description: str
    gantry_deg: tuple[float, ...]  # IEC gantry angles; 0 = beam enters anteriorly
    ptv_under: float = 800.0  # mean((dome - d)+^2) over the PTV: coverage
    ptv_boost: float = 0.03  # the coverage dome: 1 at the PTV surface, 1 + boost deep inside ...
    ptv_boost_mm: float = 10.0  # ... reached this far inside (a hot core: PTV D2 ~105 %)
    ptv_over: float = 1000.0  # mean((d - hot)+^2) over the PTV: homogeneity
    ptv_hot: float = 1.04
    bladder: float = 1.0  # mean(d^2) over each OAR outside the PTV (a gEUD with a = 2)
    rectum: float = 1.5
    femoral: float = 1.0  # each femoral head
    nto: float = 8.0  # mean((d - limit(r))+^2) over body minus PTV; 0 turns the NTO off
    nto_start: float = 1.0  # limit at the PTV surface ...
    nto_end: float = 0.35  # ... falling exponentially to this ...
    nto_falloff_per_mm: float = 0.08  # ... at this rate per mm of distance
    integral: float = 0.3  # mean(d) over body minus PTV: the low-dose bath
    smooth: float = 3.0  # fluence modulation penalty (MLC deliverability; no ripples the coarse grid misses)
    arc_smooth: float = 1.0  # fluence change between neighbouring control points (VMAT)
    beam_uniformity: float = 1.0  # squared coefficient of variation of the beams' mean fluence (VMAT)
    # Final dose only: each control point's fluence is spread over this gantry sector (two
    # sub-angles), as the gantry moves while delivering it; 0 = static beams.
    arc_sector_deg: float = 360.0 / ARC_CONTROL_POINTS
    # Relative MU per beam that `beam_uniformity` holds the plan to (None: all equal, an arc).
    beam_profile: tuple[float, ...] | None = None

    def weights(self) -> dict[str, float]:
        """The numeric objective parameters, as the optimizer takes them (traced, not static)."""
        skip = {"name", "description", "gantry_deg", "arc_sector_deg", "beam_profile"}
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}


def beam_profile(angles_deg: tuple[float, ...], strong_deg: tuple[float, ...], strength: float) -> tuple[float, ...]:
    """Relative MU per beam: `strength` for the beam nearest each direction in `strong_deg`, else 1."""
    angles = np.asarray(angles_deg)
    profile = np.ones(len(angles))
    for direction in strong_deg:
        profile[np.argmin(np.abs((angles - direction + 180.0) % 360.0 - 180.0))] = strength
    return tuple(float(v) for v in profile)


EXTERNAL_ANGLES = tuple(float(a) for a in np.arange(EXTERNAL_BEAMS) * 360.0 / EXTERNAL_BEAMS)
# The external style's spikes: the same anterior and lateral beams carry more MU in every plan;
# the other 20 beams make an arc-like low-dose bath. 2.2 keeps a source-style plan of the same
# patient within isodose Dice 0.8 of the external plan at every level (docs/synthetic_data.md).
EXTERNAL_SPIKES_DEG = (0.0, 90.0, 270.0)
EXTERNAL_SPIKE_MU = 2.2

STYLE_TABLE: dict[str, Style] = {
    s.name: s
    for s in (
        Style("source", "conformal VMAT arc with an NTO, a hot PTV core (D2 ~105 %)", gantry_deg=arc()),
        Style(
            "internal_a",
            "source with the rectum spared more aggressively (femoral heads held at source's dose)",
            gantry_deg=arc(),
            rectum=5.0,
            femoral=2.0,
        ),
        Style(
            "internal_b",
            "source with rectum and bladder spared more aggressively: arc avoiding the anterior 30 degrees, softer NTO",
            gantry_deg=arc(avoid=(0.0, 15.0)),
            rectum=2.5,
            bladder=3.0,
            femoral=1.8,
            nto=0.5,
            nto_end=0.7,
            nto_falloff_per_mm=0.03,
        ),
        Style(
            "internal_c",
            "NTO off; higher femoral-head dose traded for lower bladder and rectum dose",
            gantry_deg=arc(),
            rectum=9.0,
            bladder=9.0,
            femoral=0.0,
            ptv_under=2000.0,
            nto=0.0,
            integral=0.0,
            beam_uniformity=0.0,
            arc_smooth=0.3,
        ),
        Style(
            "external",
            "another institution: 23 fixed beams, a low-dose bath with lateral and anterior spikes, a flat PTV dose",
            gantry_deg=EXTERNAL_ANGLES,
            beam_profile=beam_profile(EXTERNAL_ANGLES, EXTERNAL_SPIKES_DEG, EXTERNAL_SPIKE_MU),
            beam_uniformity=10.0,  # holds the plan to the beam profile
            ptv_boost=0.0,  # a flat PTV dose (D2 <= ~102 %)
            ptv_hot=0.995,
            ptv_over=10000.0,
            nto=0.0,
            integral=0.1,
            arc_smooth=0.0,
            arc_sector_deg=0.0,
        ),
    )
}

STYLES: tuple[str, ...] = tuple(STYLE_TABLE)

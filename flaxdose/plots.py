"""Evaluation figures (PNG) in the style of Kandalan et al. 2020, Figs. 1-4.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot and no global
backend switch), so this module is safe to import anywhere, headless included.

- `dice_curve`: mean +/- SD isodose Dice per model against the isodose level (Fig. 3).
- `dvh_error_violins`: violins of DVH-metric differences, prediction - reference, in % of the
  prescription; targets and OARs in two panels, one violin per model (Figs. 1 and 4).
- `case_figure`: axial and sagittal dose slices through the PTV centre for the reference and
  every prediction, with structure contours, and the cumulative DVHs (Fig. 2); `write_preview`, a
  training run's preview.png, is one.

Display convention (radiological view): axial slices show the patient's right on the image
left and anterior at the top; sagittal slices show anterior on the left and superior at the top.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from flaxdose.data.case import BODY
from flaxdose.io import atomic_file
from flaxdose.metrics import cumulative_dvh, isodose_dice

log = logging.getLogger("flaxdose")

MODEL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
MODEL_LINESTYLES = (":", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path, "wb") as f:  # an interrupted save leaves the old figure or none, never half a PNG
        fig.savefig(f, format="png", bbox_inches="tight")
    return path


def dice_curve(dice_by_model: Mapping[str, np.ndarray], levels_pct: Sequence[float], path: str | Path) -> Path:
    """Mean +/- SD isodose Dice per model; `dice_by_model[name]` is (cases, levels).

    levels_pct: isodose levels in % of the prescription. Writes a PNG at `path` and returns it.
    """
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    levels = np.asarray(levels_pct, float)
    offsets = (np.arange(len(dice_by_model)) - (len(dice_by_model) - 1) / 2) * 0.8
    for i, (name, values) in enumerate(dice_by_model.items()):
        values = np.asarray(values, float).reshape(-1, len(levels))
        mean = np.nanmean(values, axis=0)
        sd = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        ax.errorbar(levels + offsets[i], mean, yerr=sd, marker="o", ms=4, capsize=3,
                    color=MODEL_COLORS[i % len(MODEL_COLORS)], label=f"{name} (n={values.shape[0]})")
    ax.set_xlabel("Isodose volume (% of prescription)")
    ax.set_ylabel("Dice similarity coefficient")
    ax.set_title("Isodose Dice vs reference dose (mean ± SD)")
    ax.set_xticks(levels)
    ax.set_ylim(max(0.0, min(0.5, ax.get_ylim()[0])), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def _violins(ax, errors_by_model: Mapping[str, Mapping[str, np.ndarray]], metrics: Sequence[str]) -> None:
    n_models = len(errors_by_model)
    width = 0.8 / n_models
    for j, (name, errors) in enumerate(errors_by_model.items()):
        color = MODEL_COLORS[j % len(MODEL_COLORS)]
        for i, metric in enumerate(metrics):
            values = np.asarray(errors.get(metric, []), float)
            values = values[np.isfinite(values)]
            x = i + (j - (n_models - 1) / 2) * width
            if values.size >= 2 and np.ptp(values) > 0:  # a KDE needs spread
                parts = ax.violinplot([values], positions=[x], widths=width * 0.95, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_edgecolor(color)
                    body.set_alpha(0.45)
                for key in ("cbars", "cmins", "cmaxes", "cmedians"):
                    parts[key].set_color(color)
            ax.plot(np.full(values.size, x), values, "o", ms=2.5, color=color, alpha=0.8)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def dvh_error_violins(
    errors_by_model: Mapping[str, Mapping[str, np.ndarray]],
    target_metrics: Sequence[str],
    oar_metrics: Sequence[str],
    path: str | Path,
    unit: str = "% of prescription",
) -> Path:
    """Violins of DVH-metric errors (in `unit`), `errors_by_model[model][metric]` per case.

    Targets and OARs in two panels (an empty metric list drops its panel); NaN values are
    skipped. Writes a PNG at `path` and returns it.
    """
    panels = [(t, m) for t, m in (("Target", target_metrics), ("Organs at risk", oar_metrics)) if m]
    ratios = [max(len(m), 2) for _, m in panels]
    fig = _new_figure(1.6 + 0.75 * sum(ratios), 4.6)
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    for ax, (title, metrics) in zip(axes, panels):
        _violins(ax, errors_by_model, metrics)
        ax.set_title(f"{title} DVH metrics")
    axes[0].set_ylabel(f"Prediction − reference ({unit})")
    handles = [Patch(color=MODEL_COLORS[j % len(MODEL_COLORS)], alpha=0.6, label=name)
               for j, name in enumerate(errors_by_model)]
    axes[-1].legend(handles=handles, loc="best", fontsize="small")
    fig.suptitle("DVH-metric differences to the reference dose")
    return _save(fig, path)


def _slice_index(case) -> tuple[int, int, int]:
    """Voxel index of the PTV centre (or of the maximum dose when there is no PTV)."""
    ptv = [case.mask(name) for name in case.targets if case.mask(name).any()]
    if ptv:
        return tuple(int(round(c)) for c in np.argwhere(ptv[0]).mean(axis=0))
    return tuple(int(i) for i in np.unravel_index(np.argmax(case.dose), case.dose.shape))


def _views(case, index):
    """(name, 2-D image with rows top->bottom, extent in mm, {structure: 2-D mask}) per view."""
    (i, _, k), (sx, sy, sz) = index, case.spacing_mm
    nx, ny, nz = case.shape
    contoured = {n: m for n, m in zip(case.structures, case.masks) if n != BODY}
    axial = lambda v: v[:, :, k].T  # rows y (anterior at top), columns x (patient right at left)
    sagittal = lambda v: v[i, :, :].T[::-1]  # rows z (superior at top), columns y (anterior at left)
    return [
        (f"axial z={k}", axial, (0, nx * sx, ny * sy, 0)),
        (f"sagittal x={i}", sagittal, (0, ny * sy, 0, nz * sz)),
    ], contoured


def _structure_colors(names: Sequence[str]) -> dict[str, str]:
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def case_figure(reference, predictions: Mapping[str, object], path: str | Path) -> Path:
    """Dose slices (axial, sagittal) and DVHs of `reference` and each prediction (Case objects).

    Predictions must be on the reference's grid: slices and DVHs use the reference's masks.
    Slices go through the centre of the first non-empty target (the dose maximum without one); the colour scale (Gy)
    tops at 1.1 x max(reference dose, prescription). Writes a PNG at `path` and returns it.
    """
    doses = {"Reference": reference.dose, **{name: p.dose for name, p in predictions.items()}}
    dose_max = max(float(np.max(d)) for d in doses.values()) or 1.0
    # Colour scale from the reference (hot spots of a prediction saturate; the DVH shows them).
    vmax = 1.1 * max(float(np.max(reference.dose)), reference.prescription_gy) or dose_max
    views, contoured = _views(reference, _slice_index(reference))
    colors = _structure_colors([n for n in reference.structures if n != BODY])
    n_cols = len(doses)
    fig = _new_figure(2.9 * n_cols + 6.6, 6.0)
    grid = fig.add_gridspec(2, n_cols + 3, width_ratios=[1] * n_cols + [0.06, 0.45, 1.8], wspace=0.25)
    image = None
    for row, (view, cut, extent) in enumerate(views):
        for col, (name, dose) in enumerate(doses.items()):
            ax = fig.add_subplot(grid[row, col])
            image = ax.imshow(cut(dose), cmap="jet", vmin=0, vmax=vmax, extent=extent, interpolation="nearest")
            for structure, mask in contoured.items():
                plane = cut(mask).astype(float)
                if plane.any():
                    ax.contour(plane, levels=[0.5], colors="white", linestyles=":", linewidths=1.0,
                               extent=extent, origin="upper")
            ax.set_title(f"{name}\n{view}" if row == 0 else view, fontsize="small")
            ax.set_xlabel("x (mm, R→L)" if row == 0 else "y (mm, A→P)", fontsize="x-small")
            ax.set_ylabel(("y (mm, A→P)" if row == 0 else "z (mm, I→S)") if col == 0 else "", fontsize="x-small")
            ax.tick_params(labelsize="x-small")
    cbar = fig.colorbar(image, cax=fig.add_subplot(grid[:, n_cols]), extend="max" if dose_max > vmax else "neither")
    cbar.set_label("Dose (Gy)")
    _dvh_panel(fig.add_subplot(grid[:, n_cols + 2]), reference, doses, colors, max(vmax, dose_max))
    fig.suptitle(f"Case {reference.case_id}: reference vs predicted dose")
    return _save(fig, path)


def write_preview(workdir: Path, model, case) -> Path:
    """preview.png in `workdir`: the dose `model` (a `flaxdose.inference.Model`) predicts next to the reference for
    one validation case (`case_figure`); its mean isodose Dice is logged and named in the figure."""
    predicted = model.predict([case])[0]
    dice = isodose_dice(predicted.dose, case.dose, case.prescription_gy, body=case.dose_region())["mean"]
    log.info("validation case %s: mean isodose Dice %.3f (preview.png)", case.case_id, dice)
    return case_figure(case, {f"prediction (Dice {dice:.2f})": predicted}, Path(workdir) / "preview.png")


def _dvh_panel(ax, reference, doses: Mapping[str, np.ndarray], colors: Mapping[str, str], vmax: float) -> None:
    grid = np.linspace(0.0, vmax * 1.02, 300)
    for k, (source, dose) in enumerate(doses.items()):
        style = "-" if k == 0 else MODEL_LINESTYLES[(k - 1) % len(MODEL_LINESTYLES)]
        for structure, color in colors.items():
            mask = reference.mask(structure)
            if mask.any():
                ax.plot(grid, cumulative_dvh(dose, mask, grid), color=color, linestyle=style, lw=1.4)
    structure_handles = [Line2D([], [], color=c, lw=2, label=s) for s, c in colors.items()]
    source_handles = [Line2D([], [], color="k", linestyle="-" if k == 0 else MODEL_LINESTYLES[(k - 1) % 4],
                             label=source) for k, source in enumerate(doses)]
    legend = dict(loc="upper left", fontsize="x-small", title_fontsize="small")
    ax.add_artist(ax.legend(handles=structure_handles, bbox_to_anchor=(1.02, 1.0), title="Structure", **legend))
    ax.legend(handles=source_handles, bbox_to_anchor=(1.02, 0.45), title="Dose (line)", **legend)
    _dvh_axes(ax, reference.prescription_gy, grid[-1], "Cumulative DVH")


def _dvh_axes(ax, prescription_gy: float, max_gy: float, title: str) -> None:
    """A cumulative DVH's axes: 0..max_gy Gy by 0..102 % volume, the prescription dashed (when > 0), a grid."""
    if prescription_gy > 0:
        ax.axvline(prescription_gy, color="0.5", lw=0.8, linestyle="--")
    ax.set_xlim(0, max_gy)
    ax.set_ylim(0, 102)
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)


def learning_curves(
    panels: Mapping[str, Mapping[str, Mapping[str, Mapping[int, Sequence[float]]]]],
    baselines: Mapping[str, Mapping[str, float]],
    path: str | Path,
) -> Path:
    """Few-shot learning curves: `panels[metric][style][curve][n]` lists one value per seed.

    One row of panels per metric, one column per style; each curve is the mean over seeds
    with a band over their range; `baselines[metric][style]` (the unadapted source model)
    is drawn as a dashed line.
    """
    metrics, styles = list(panels), list(dict.fromkeys(s for m in panels.values() for s in m))
    fig = _new_figure(3.6 * len(styles) + 1.6, 3.2 * len(metrics))
    axes = fig.subplots(len(metrics), len(styles), squeeze=False)
    curve_names = list(dict.fromkeys(c for m in panels.values() for s in m.values() for c in s))
    colors = {c: MODEL_COLORS[i % len(MODEL_COLORS)] for i, c in enumerate(curve_names)}
    for row, metric in enumerate(metrics):
        for col, style in enumerate(styles):
            ax = axes[row, col]
            for name, by_n in panels[metric].get(style, {}).items():
                ns = sorted(by_n)
                values = [np.asarray(by_n[n], float) for n in ns]
                ax.plot(ns, [np.nanmean(v) for v in values], marker="o", ms=4, color=colors[name], label=name)
                ax.fill_between(ns, [np.nanmin(v) for v in values], [np.nanmax(v) for v in values],
                                color=colors[name], alpha=0.18, linewidth=0)
            base = baselines.get(metric, {}).get(style)
            if base is not None:
                ax.axhline(base, color="black", linestyle="--", linewidth=1, label="source model, unadapted")
            ax.set_xscale("log")
            ax.set_xticks(sorted({n for c in panels[metric].get(style, {}).values() for n in c}))
            ax.xaxis.set_major_formatter("{x:g}")
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(style)
            if row == len(metrics) - 1:
                ax.set_xlabel("target training plans")
            if col == 0:
                ax.set_ylabel(metric)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="mode (line: mean, band: range over seeds)", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


DVH_POINT_VOLUME_PCT = {"D2": 2.0, "D95": 95.0, "D98": 98.0}  # where a Dx metric sits on a cumulative DVH


def plan_bands(plan, member_doses: np.ndarray, rows: Sequence[Mapping], path: str | Path) -> Path:
    """Plan QA figure: the plan's DVHs over the predicted ones, every DVH metric against its band, and where
    the plan's dose differs from the prediction.

    Left: the plan's cumulative DVH per structure (solid), the ensemble's mean predicted DVH (dashed),
    the range of the members' DVHs (shaded: model spread only, uncalibrated) and the calibrated bands
    of D2/D95/D98 as horizontal bars at their volumes; legend below the axes, clear of the bands.
    Middle: each metric's band (bar, tick at the centre) and the plan's value (dot; red when flagged).
    Right: plan minus mean predicted dose (Gy) on the axial slice through the target centre, in
    patient mm (x right->left, y anterior->posterior), structure outlines. `plan`: a Case with dose
    (Gy, [x, y, z]); `member_doses`: (M, X, Y, Z) Gy on the plan's grid; `rows`: the plan's rows of
    `flaxdose.planqa.check_plan`.
    """
    structures = [n for n in plan.structures if n != BODY]
    colors = _structure_colors(structures)
    mean_dose = np.mean(member_doses, axis=0)
    vmax = 1.1 * max(float(np.max(plan.dose)), float(np.max(member_doses)), plan.prescription_gy)
    grid = np.linspace(0.0, vmax, 300)
    fig = _new_figure(17.5, 5.6)
    dvh_ax, band_ax, diff_ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.4, 1.0, 1.1], "wspace": 0.5})
    for structure in structures:
        mask = plan.mask(structure)
        if not mask.any():
            continue
        members = np.stack([cumulative_dvh(d, mask, grid) for d in member_doses])
        dvh_ax.fill_between(grid, members.min(axis=0), members.max(axis=0), color=colors[structure], alpha=0.2, lw=0)
        dvh_ax.plot(grid, cumulative_dvh(mean_dose, mask, grid), color=colors[structure], lw=1.2, linestyle="--")
        dvh_ax.plot(grid, cumulative_dvh(plan.dose, mask, grid), color=colors[structure], lw=1.6, label=structure)
    banded = [r for r in rows if r.get("position", "n/a") != "n/a"]
    for r in banded:
        volume = DVH_POINT_VOLUME_PCT.get(r["metric"])
        if volume is not None:
            dvh_ax.plot([r["lower_gy"], r["upper_gy"]], [volume, volume], color=colors[r["structure"]], lw=4, alpha=0.6,
                        solid_capstyle="butt")
            if r["flagged"]:
                dvh_ax.plot(r["plan_gy"], volume, "x", color="red", ms=9, mew=2)
    if plan.prescription_gy > 0:
        dvh_ax.axvline(plan.prescription_gy, color="0.5", lw=0.8, linestyle="--")
    dvh_ax.set(xlim=(0, vmax), ylim=(0, 102), xlabel="Dose (Gy)", ylabel="Volume (%)")
    dvh_ax.set_title("DVH: plan (solid), predicted mean (dashed), members (shaded), bands (bars)", fontsize="small")
    handles = [Line2D([], [], color=colors[s], lw=2, label=s) for s in structures if plan.mask(s).any()]
    handles += [Line2D([], [], color="k", lw=1.6, label="plan"),
                Line2D([], [], color="k", lw=1.2, linestyle="--", label="predicted (mean)"),
                Patch(color="0.6", alpha=0.4, label="members' range")]
    dvh_ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize="x-small")
    dvh_ax.grid(alpha=0.3)
    for y, r in enumerate(banded):
        color = colors[r["structure"]]
        band_ax.plot([r["lower_gy"], r["upper_gy"]], [y, y], color=color, lw=5, alpha=0.5, solid_capstyle="butt")
        band_ax.plot(r["predicted_gy"], y, "|", color=color, ms=12, mew=2)
        band_ax.plot(r["plan_gy"], y, "o", color="red" if r["flagged"] else "black", ms=6)
    band_ax.set_yticks(range(len(banded)), [f"{r['structure']} {r['metric']}" for r in banded], fontsize="x-small")
    band_ax.invert_yaxis()
    band_ax.set_xlabel("Dose (Gy)")
    band_ax.set_title("Band (bar, centre tick) and plan (dot; red = flagged)", fontsize="small")
    band_ax.grid(alpha=0.3, axis="x")
    _difference_panel(diff_ax, plan, plan.dose - mean_dose, colors, fig)
    flagged = sum(bool(r["flagged"]) for r in rows)
    grid_note = f" ({rows[0]['grid']})" if rows and rows[0].get("grid") else ""
    fig.suptitle(f"Plan {plan.case_id}: {flagged} metric(s) flagged{grid_note}")
    return _save(fig, path)


def _difference_panel(ax, case, difference: np.ndarray, colors: Mapping[str, str], fig) -> None:
    """Axial slice through the target centre of `difference` (Gy, [x, y, z]), symmetric diverging scale, mm axes."""
    _, _, k = _slice_index(case)
    xs = [case.origin_mm[a] + case.spacing_mm[a] * np.array([-0.5, case.shape[a] - 0.5]) for a in range(2)]
    extent = (xs[0][0], xs[0][1], xs[1][1], xs[1][0])  # anterior (small y) at the top
    plane = difference[:, :, k].T
    limit = float(np.max(np.abs(plane))) or 1.0
    image = ax.imshow(plane, cmap="RdBu_r", vmin=-limit, vmax=limit, extent=extent, origin="upper",
                      interpolation="nearest")
    for structure, color in colors.items():
        mask = case.mask(structure)[:, :, k].T.astype(float)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=color, linewidths=1.0, extent=extent, origin="upper")
    z = case.origin_mm[2] + k * case.spacing_mm[2]
    ax.set_title(f"plan - predicted (Gy), axial z = {z:.1f} mm", fontsize="small")
    ax.set_xlabel("x (mm, R→L)", fontsize="x-small")
    ax.set_ylabel("y (mm, A→P)", fontsize="x-small")
    ax.tick_params(labelsize="x-small")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("Gy", fontsize="x-small")


ISODOSE_LINES_PCT = (95, 80, 50, 20)  # of the prescription, as a planning system shows them
ISODOSE_LINE_COLORS = ("red", "orange", "yellow", "cyan")


def plan_dose_figure(case, path: str | Path, title: str = "") -> Path:
    """One plan's dose: axial, coronal and sagittal slices through the target centre and its DVHs.

    `case`: a Case with `dose` (Gy, [x, y, z]), masks, `origin_mm`, `spacing_mm` (LPS) and a
    prescription. Slices show the dose in grey, isodose lines at `ISODOSE_LINES_PCT` % of the
    prescription, and each structure's outline in its own colour (legend); axes are patient
    coordinates in mm (x right->left, y anterior->posterior, z inferior->superior; the slice
    position is in each title). Radiological view: patient right on the image left, anterior up
    (axial), superior up (coronal, sagittal). Writes a PNG at `path` and returns it.
    """
    dose = np.asarray(case.dose, np.float32)
    rx = float(case.prescription_gy) or float(dose.max()) or 1.0
    i, j, k = _slice_index(case)
    coords = [case.origin_mm[a] + case.spacing_mm[a] * np.arange(case.shape[a]) for a in range(3)]
    half = [case.spacing_mm[a] / 2 for a in range(3)]
    ext = lambda a: (coords[a][0] - half[a], coords[a][-1] + half[a])
    views = [  # (title, cut to 2-D rows x cols, (x0, x1, y_bottom, y_top), x label, y label)
        (f"axial z = {coords[2][k]:.1f} mm", lambda v: v[:, :, k].T, (*ext(0), ext(1)[1], ext(1)[0]),
         "x (mm, R→L)", "y (mm, A→P)"),
        (f"coronal y = {coords[1][j]:.1f} mm", lambda v: v[:, j, :].T, (*ext(0), *ext(2)), "x (mm, R→L)",
         "z (mm, I→S)"),
        (f"sagittal x = {coords[0][i]:.1f} mm", lambda v: v[i, :, :].T, (*ext(1), *ext(2)), "y (mm, A→P)",
         "z (mm, I→S)"),
    ]
    structures = [n for n in case.structures if n != BODY]
    palette = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray", "navy")
    colors = {n: palette[i % len(palette)] for i, n in enumerate(structures)}  # none an isodose line's colour
    fig = _new_figure(17.0, 4.8)
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.25], wspace=0.35)
    vmax = 1.1 * max(float(dose.max()), rx)
    for col, (name, cut, extent, xlabel, ylabel) in enumerate(views):
        ax = fig.add_subplot(grid[0, col])
        origin = "upper" if col == 0 else "lower"
        ax.imshow(cut(dose), cmap="gray", vmin=0, vmax=vmax, extent=extent, origin=origin, interpolation="nearest")
        plane = cut(dose)
        levels = [p / 100 * rx for p in sorted(ISODOSE_LINES_PCT)]
        if plane.max() >= levels[0]:
            ax.contour(plane, levels=levels, colors=list(ISODOSE_LINE_COLORS[::-1]), linewidths=1.0, extent=extent,
                       origin=origin)
        for structure in structures:
            mask = cut(case.mask(structure)).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colors[structure], linewidths=1.3, extent=extent, origin=origin)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel(xlabel, fontsize="x-small")
        ax.set_ylabel(ylabel, fontsize="x-small")
        ax.tick_params(labelsize="x-small")
        ax.set_aspect("equal")
    ax = fig.add_subplot(grid[0, 3])
    doses = np.linspace(0.0, vmax, 300)
    for structure in structures:
        mask = case.mask(structure)
        if mask.any():
            ax.plot(doses, cumulative_dvh(dose, mask, doses), color=colors[structure], lw=1.4)
    _dvh_axes(ax, rx, doses[-1], "Cumulative DVH (prescription dashed)")
    handles = [Line2D([], [], color=colors[s], lw=2, label=s) for s in structures]
    handles += [Line2D([], [], color=c, lw=1, label=f"{p} % Rx ({p / 100 * rx:.1f} Gy)")
                for p, c in zip(ISODOSE_LINES_PCT, ISODOSE_LINE_COLORS)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small")
    fig.suptitle(title or f"Dose, prescription {rx:g} Gy", fontsize="small")
    return _save(fig, path)


def roc_curves(panels: Mapping[str, Mapping[str, Mapping]], path: str | Path, title: str = "",
               point_label: str = "operating point") -> Path:
    """ROC curves, one panel per key of `panels` (e.g. the organ a degradation affects), one curve per entry.

    `panels[panel][label]` holds ``fpr`` and ``tpr`` (sequences of the same length, fractions in [0, 1],
    from (0, 0) to (1, 1): `flaxdose.planqa.roc_curve`), ``auc`` (float, shown in the legend) and
    optionally ``point``, an (fpr, tpr) pair drawn as a large marker (`point_label` names it in the
    legend, e.g. the check's default level). Points are joined by straight lines (the trapezoids
    whose area is the AUC); the dotted diagonal is chance. Writes a PNG at `path` and returns it.
    """
    fig = _new_figure(4.2 * len(panels) + 0.4, 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, curves) in zip(axes, panels.items()):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, linestyle=":")
        for i, (label, c) in enumerate(curves.items()):  # curves that coincide stay visible: wide below, dashed above
            color = MODEL_COLORS[i % len(MODEL_COLORS)]
            ax.plot(c["fpr"], c["tpr"], color=color, lw=max(3.2 - 0.8 * i, 1.0), marker="o", ms=2.5, alpha=0.9,
                    linestyle=("-", "--", ":", "-.")[i % 4], label=f"{label} (AUC {c['auc']:.2f})")
            if c.get("point") is not None:
                ax.plot(*c["point"], marker="*", ms=14 - 2 * min(i, 3), color=color, mec="black", mew=0.8,
                        linestyle="none")
        ax.plot([], [], marker="*", ms=11, color="white", mec="black", linestyle="none", label=point_label)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title=panel,
               xlabel="false-positive rate (good plans flagged)", ylabel="true-positive rate (worse plans flagged)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))  # the title above the panels' own
    return _save(fig, path)

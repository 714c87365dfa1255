"""What a reader trips on in a figure, found before it is saved: `book.save_figure` refuses a figure with any of

    overlapping labels   two tick labels of one axis, or two text labels in one plot, drawn over each other
    blank labels         a tick label that is only whitespace where its neighbours have text (a space byte,
                         say, drawn as nothing: name it instead)
    a bare log axis      a log-scaled axis with fewer than two labelled ticks (no way to read a value off it)

Positions are measured on the drawn figure (matplotlib's renderer), so the check sees what the PNG will show.

Does not include: colour choices, legends covering data, or anything about what the figure means.
"""

from __future__ import annotations

OVERLAP_PIXELS = 1.0   # boxes may touch; a shared strip wider than this is an overlap


def _overlap(a, b) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > OVERLAP_PIXELS) and (min(a.y1, b.y1) - max(a.y0, b.y0) > OVERLAP_PIXELS)


def _overlapping(texts, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if _overlap(box_a, box_b)]


def problems(fig) -> list[str]:
    """Every defect above in `fig`, one sentence each (empty when there is none)."""
    if not hasattr(fig.canvas, "get_renderer"):        # a Figure made without pyplot: give it a drawing canvas
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for index, ax in enumerate(fig.axes):
        where = f"axes {index}" + (f" ({ax.get_title()!r})" if ax.get_title() else "")
        for axis_name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = [t for t in axis.get_ticklabels() if t.get_visible()]
            clashes = _overlapping(labels, renderer)
            if clashes:
                found.append(f"{where}: {len(clashes)} pair(s) of {axis_name} tick labels overlap, e.g. "
                             f"{clashes[0][0]!r} and {clashes[0][1]!r}")
            texts = [t.get_text() for t in labels]
            if any(t.strip() for t in texts) and any(t and not t.strip() for t in texts):
                found.append(f"{where}: a {axis_name} tick label is blank (only whitespace) among labelled ones")
            scale = ax.get_xscale() if axis_name == "x" else ax.get_yscale()
            if scale == "log" and axis.get_visible() and ax.axison:
                low, high = sorted(ax.get_xlim() if axis_name == "x" else ax.get_ylim())
                ticks = (list(zip(axis.get_ticklabels(), axis.get_majorticklocs()))
                         + list(zip(axis.get_ticklabels(minor=True), axis.get_minorticklocs())))
                shown = [t for t, value in ticks if t.get_visible() and t.get_text().strip() and low <= value <= high]
                if len(shown) < 2:
                    found.append(f"{where}: the log-scaled {axis_name} axis has {len(shown)} labelled tick(s); "
                                 "a reader needs at least two")
        clashes = _overlapping(ax.texts, renderer)
        if clashes:
            found.append(f"{where}: {len(clashes)} pair(s) of text labels overlap, e.g. {clashes[0][0]!r} and "
                         f"{clashes[0][1]!r}")
    return found

"""Human-facing views of a `RouteStats`: a rich terminal table and a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from moekit.errors import UserError
from moekit.stats.outputs import write_file
from moekit.stats.result import RouteStats


def _expert(stats: RouteStats, e: int) -> str:
    return f"{e}:{stats.expert_names[e]}" if stats.expert_names else str(e)


def _top_experts(stats: RouteStats, fractions: np.ndarray, n: int = 2) -> str:
    order = np.argsort(-fractions, kind="stable")[:n]
    if stats.expert_names:
        return " ".join(f"{_expert(stats, e)} {fractions[e]:.0%}" for e in order)
    return " ".join(f"{e}:{fractions[e]:.0%}" for e in order)


# A table as data: its column headers (the first one names the rows), cells and row styles, so it can be drawn
# whole or split into several tables that each fit the terminal.
_RIGHT = "right"


def _summary_grid(stats: RouteStats) -> tuple[list[str], list[list[str]], list[str | None]]:
    spec = stats.specialisation
    headers = ["layer", "max/mean", "cv", "aux", "H", "p top1", "dead", "top experts", "next"]
    if spec is not None:
        headers.append("MI")
    fractions = stats.fractions
    rows, styles = [], []
    for i, layer in enumerate(stats.layers):
        row = [
            str(layer),
            f"{stats.max_over_mean[i]:.2f}",
            f"{stats.cv[i]:.2f}",
            f"{stats.switch_aux[i]:.2f}",
            f"{stats.entropy_bits[i]:.2f}",
            f"{stats.top1_prob[i]:.2f}",
            str(int(stats.dead[i].sum())),
            _top_experts(stats, fractions[i]),
            f"{stats.top1_agreement[i]:.0%}/{stats.top1_chance[i]:.0%}" if i + 1 < len(stats.layers) else "",
        ]
        if spec is not None:
            row.append(f"{spec.mi_bits[i]:.2f}/{spec.mi_normalised[i]:.2f}")
        rows.append(row)
        styles.append("red" if stats.dead[i].any() else None)
    overall = stats.overall()
    agreement = overall["top1_agreement"]
    last = [
        "all",
        f"{overall['max_over_mean']:.2f}",
        f"{overall['cv']:.2f}",
        f"{overall['switch_aux']:.2f}",
        f"{overall['entropy_bits']:.2f}",
        f"{overall['top1_prob']:.2f}",
        str(overall["num_dead_experts"]),
        _top_experts(stats, np.asarray(overall["fractions"])),
        "" if agreement is None else f"{agreement:.0%}/{overall['top1_chance']:.0%}",
    ]
    if spec is not None:
        last.append(f"{spec.mean_mi_bits:.2f}/{spec.mean_mi_normalised:.2f}")
    rows.append(last)
    styles.append("bold")
    return headers, rows, styles


def _label_grid(stats: RouteStats) -> tuple[list[str], list[list[str]], list[str | None]]:
    spec = stats.specialisation
    headers = ["label", "tokens", "top expert", "share", "largest shares"]
    rows = [
        [
            y,
            str(stats.label_tokens[y]),
            _expert(stats, spec.top_expert[y]),
            f"{spec.top_share[y]:.0%}",
            _top_experts(stats, spec.distribution[y], 4),
        ]
        for y in spec.labels
    ]
    return headers, rows, [None] * len(rows)


def _table(headers, rows, styles, columns: list[int], title: str | None, caption: str | None) -> Table:
    """Columns `columns` of a grid; every column may wrap (or fold a long word) rather than lose characters."""
    table = Table(
        title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
        pad_edge=False, padding=(0, 1), collapse_padding=True,
    )  # fmt: skip
    for c in columns:
        text_column = c == 0 or headers[c] in ("top experts", "largest shares", "top expert")
        table.add_column(headers[c], justify="left" if text_column else _RIGHT, overflow="fold")
    last = len(rows) - 1
    for r, (row, style) in enumerate(zip(rows, styles)):
        table.add_row(*(row[c] for c in columns), style=style, end_section=r == last and style == "bold")
    return table


def _fitted(console: Console, grid, title: str, caption: str | None) -> list[Table | Text]:
    """The grid as one table if it fits the console's width, else as a stack of tables that each repeat the first
    column and take as many of the others as fit (a column wider than the console on its own wraps), followed
    by the caption as a paragraph."""
    headers, rows, styles = grid

    def width(columns: list[int]) -> int:
        options = console.options.update(width=10_000)
        return Measurement.get(console, options, _table(headers, rows, styles, columns, None, None)).maximum

    groups: list[list[int]] = [[0]]
    for c in range(1, len(headers)):
        if len(groups[-1]) > 1 and width([*groups[-1], c]) > console.width:
            groups.append([0])
        groups[-1].append(c)
    if len(groups) == 1:
        return [_table(headers, rows, styles, groups[0], title, caption)]
    tables: list = [
        _table(headers, rows, styles, columns, title if i == 0 else None, None)
        for i, columns in enumerate(groups)
    ]
    return tables + ([Text(caption)] if caption else [])


def _summary_title(stats: RouteStats) -> str:
    return (
        f"route-stats {stats.model} ({stats.architecture}, E={stats.num_experts}, k={stats.top_k}, "
        f"{stats.tokens} tokens)"
    )


def _summary_caption(stats: RouteStats) -> str:
    caption = (
        "max/mean, cv, aux: load balance (1, 0, 1 = even). H: router entropy in bits (max "
        f"{np.log2(stats.num_experts):.2f}). dead: < 1% of an even share. next: same top-1 expert in the next "
        "MoE layer / chance level."
    )
    if stats.expert_names:
        caption += " Experts are index:source model, from moekit_config.yaml."
    if stats.specialisation is not None:
        caption += " MI: I(label; expert) in bits / normalised."
    return caption


def summary_table(stats: RouteStats) -> Table:
    """Per-layer rows and an 'all' row: balance, confidence, dead experts, top experts, consistency, and the
    label information (MI) per layer when prompts are labelled. `print_report` splits it on narrow terminals."""
    grid = _summary_grid(stats)
    return _table(*grid, list(range(len(grid[0]))), _summary_title(stats), _summary_caption(stats))


def label_table(stats: RouteStats) -> Table | None:
    """Per label: tokens, the top expert pooled over layers with its share, and the four largest shares."""
    spec = stats.specialisation
    if spec is None:
        return None
    grid = _label_grid(stats)
    return _table(*grid, list(range(len(grid[0]))), _label_title(stats), None)


def _label_title(stats: RouteStats) -> str:
    spec = stats.specialisation
    return (
        f"specialisation: I(label; expert) = {spec.mean_mi_bits:.3f} bits "
        f"(normalised {spec.mean_mi_normalised:.2f}), mean over layers"
    )


def print_report(stats: RouteStats, console: Console | None = None) -> None:
    """Print the summary (and, with labels, the specialisation) tables, split to fit the console's width."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped into a file or a pager: no width to respect, so do not squeeze
            console = Console(width=120)
    for table in _fitted(console, _summary_grid(stats), _summary_title(stats), _summary_caption(stats)):
        console.print(table)
    if stats.specialisation is not None:
        for table in _fitted(console, _label_grid(stats), _label_title(stats), None):
            console.print(table)


def _tick_positions(n: int, max_ticks: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / max_ticks)))
    return np.arange(0, n, step)


def plot(stats: RouteStats, path: str | Path) -> Path:
    """Write `render_plot` to `path` (its suffix names the format: .png, .pdf, .svg), whole or not at all."""
    return write_file(path, render_plot(stats, Path(path).suffix.lstrip(".").lower() or "png"))


def render_plot(stats: RouteStats, image_format: str = "png") -> bytes:
    """The image: a layers x experts heatmap of load relative to a uniform share (dead experts marked), and,
    with labels, the per-label expert distribution pooled over layers and the mutual information per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    num_layers, num_experts = stats.counts.shape
    spec = stats.specialisation
    width = float(np.clip(3.5 + 0.2 * num_experts, 8, 20))
    heat_height = float(np.clip(1.5 + 0.17 * num_layers, 3.5, 12))
    label_height = 0.0 if spec is None else float(np.clip(1.6 + 0.35 * len(spec.labels), 2.6, 5))
    fig = plt.figure(figsize=(width, heat_height + label_height), layout="constrained")
    if spec is None:
        heat_ax = fig.add_subplot()
    else:
        grid = fig.add_gridspec(2, 2, height_ratios=[heat_height, label_height], width_ratios=[3, 1])
        heat_ax = fig.add_subplot(grid[0, :])

    relative = stats.fractions * num_experts
    image = heat_ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=heat_ax, label="load / uniform share (1 = balanced)", pad=0.01)
    dead_rows, dead_cols = np.nonzero(stats.dead)
    if dead_rows.size:
        heat_ax.scatter(
            dead_cols, dead_rows, marker="x", s=18, c="red", linewidths=1, label="dead (< 1% of uniform)"
        )
        heat_ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    expert_ticks = _tick_positions(num_experts, 32)
    expert_labels = [_expert(stats, int(e)) for e in expert_ticks]
    rotation = 90 if stats.expert_names else 0
    layer_ticks = _tick_positions(num_layers, 24)
    heat_ax.set_xticks(expert_ticks, expert_labels, fontsize=8, rotation=rotation)
    heat_ax.set_yticks(layer_ticks, [str(stats.layers[i]) for i in layer_ticks], fontsize=8)
    heat_ax.set_xlabel("expert")
    heat_ax.set_ylabel("layer")
    heat_ax.set_title(
        f"{Path(stats.model).name or stats.model}: tokens per expert, {stats.tokens} tokens, k={stats.top_k} "
        f"(mean max/mean {stats.max_over_mean.mean():.2f})",
        fontsize=10,
    )

    if spec is not None:
        label_ax = fig.add_subplot(grid[1, 0])
        shares = np.stack([spec.distribution[y] for y in spec.labels])
        label_image = label_ax.imshow(shares, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
        fig.colorbar(label_image, ax=label_ax, label="share of label's assignments", pad=0.01)
        if num_experts <= 16:
            for (row, col), value in np.ndenumerate(shares):
                colour = "black" if value > 0.6 * shares.max() else "white"
                label_ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=8, color=colour)
        label_ax.set_xticks(expert_ticks, expert_labels, fontsize=8, rotation=rotation)
        label_ax.set_yticks(range(len(spec.labels)), spec.labels, fontsize=9)
        label_ax.set_xlabel("expert (pooled over layers)")
        label_ax.set_title("expert distribution per label", fontsize=10)

        mi_ax = fig.add_subplot(grid[1, 1])
        mi_ax.plot(stats.layers, spec.mi_normalised, marker="o", markersize=3)
        mi_ax.set_ylim(0, 1)
        mi_ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        mi_ax.set_xlabel("layer")
        mi_ax.set_ylabel("I(label; expert) / bound")
        mi_ax.set_title(f"specialisation: mean {spec.mean_mi_bits:.3f} bits", fontsize=10)
        mi_ax.grid(alpha=0.3)

    image = io.BytesIO()
    try:
        fig.savefig(image, format=image_format, dpi=110)
    except ValueError as err:  # a format matplotlib does not know
        raise UserError(f"cannot draw the plot as '{image_format}': {str(err).splitlines()[0]}") from None
    finally:
        plt.close(fig)
    return image.getvalue()

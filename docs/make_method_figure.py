"""Draw docs/method.png, the one-picture summary of the training method (run: python docs/make_method_figure.py)."""

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, xy, text, colour, w=2.3, h=0.9):
    x, y = xy
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=colour, ec="0.2", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def arrow(ax, a, b, text="", colour="0.25", style="-|>", rad=0.0, dy=0.12):
    ax.add_patch(
        FancyArrowPatch(
            a, b, arrowstyle=style, mutation_scale=12, color=colour, lw=1.3, connectionstyle=f"arc3,rad={rad}"
        )
    )
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, text, ha="center", va="bottom", fontsize=8, color=colour)


def main(out=Path(__file__).with_name("method.png")):
    fig = Figure(figsize=(10, 4.6), dpi=110)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    box(ax, (1.4, 4.4), "labelled images\n+ masks (5 %)", "#dfe8f5")
    box(ax, (1.4, 1.4), "unlabelled images\n(95 %)", "#eeeeee")
    box(ax, (5.2, 4.4), "UNeXt (A)\n1.47 M params, deployed", "#c9e7c9")
    box(ax, (5.2, 1.4), "Swin-Unet (B)\n27.2 M params", "#f6dcc0")
    box(ax, (10.0, 1.4), "EMA teacher of B\nalpha = min(1-1/(t+1), 0.99)", "#f9efe2", w=2.7)
    box(ax, (10.0, 4.4), "supervised loss\n0.5 (CE + Dice) on A and B", "#dfe8f5", w=2.7)
    for y in (4.4, 1.4):
        arrow(ax, (2.6, 4.4 if y == 4.4 else 1.4), (4.0, 4.4), rad=0.0 if y == 4.4 else -0.15)
        arrow(ax, (2.6, y), (4.0, 1.4), rad=0.0 if y == 1.4 else 0.15)
    arrow(ax, (6.4, 4.4), (8.6, 4.4), "labelled rows")
    arrow(ax, (5.0, 3.9), (5.0, 1.9), colour="#7a3b9a", style="<|-|>")
    ax.text(
        4.85,
        2.9,
        "cross pseudo supervision\n(Dice vs the other's argmax)",
        fontsize=8,
        color="#7a3b9a",
        ha="right",
        va="center",
    )
    ax.text(5.55, 2.9, "information divergence\nKL(pA||pB) + MIG", fontsize=8, color="#b03030", va="center")
    arrow(ax, (6.4, 1.6), (8.6, 1.6), colour="#a06000")
    ax.text(7.5, 2.05, "ICT: B(mix(u0, u1))\nvs mix(T(u0), T(u1))", fontsize=8, color="#a06000", ha="center")
    arrow(ax, (6.4, 1.15), (8.6, 1.15), "EMA update", "0.5", dy=-0.45)
    ax.text(
        6,
        0.25,
        "unsupervised weights ramp up as W exp(-5 (1 - t/T)^2); ICT starts after a warm-up",
        ha="center",
        fontsize=8,
        color="0.3",
    )
    fig.savefig(out)
    return out


if __name__ == "__main__":
    print(main())

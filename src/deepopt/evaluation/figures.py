"""The evaluate stage's figures of a test set: the confusion matrix and the first
misclassified images (drawn as ``Figure`` objects; ``deepopt.figures.png_bytes`` renders)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    import torch

__all__ = ["MISCLASSIFIED_SHOWN", "confusion_figure", "misclassified_figure"]

MISCLASSIFIED_SHOWN = 36  # a 6 x 6 grid: the first misclassified test images in file order


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix as a heat map with its counts (rows true, columns predicted)."""
    size = len(class_names)
    fig = Figure(figsize=(1.0 + 0.65 * size, 0.6 + 0.6 * size))
    axis = fig.add_subplot()
    counts = confusion.numpy()
    image = axis.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    threshold = counts.max() / 2.0  # white text on dark cells
    for row in range(size):
        for col in range(size):
            colour = "white" if counts[row, col] > threshold else "black"
            axis.text(
                col, row, str(counts[row, col]), ha="center", va="center", color=colour, fontsize=8
            )
    axis.set_xticks(range(size), list(class_names), rotation=45, ha="right")
    axis.set_yticks(range(size), list(class_names))
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    log_probs: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    shown: int = MISCLASSIFIED_SHOWN,
    columns: int = 6,
) -> Figure:
    """The first ``shown`` misclassified uint8 images [N, H, W] (or colour [N, 3, H, W]) in
    file order, each under its true label, the predicted one and the predicted probability.

    One mosaic image in one axes, not an axes per image: 36 axes took ~1 s to draw.
    """
    import torch  # lazy: the report stage draws its figures without torch

    predictions = log_probs.argmax(dim=1)
    wrong = (predictions != labels).nonzero().flatten()
    picked = wrong[:shown].tolist()
    rows = max(1, -(-len(picked) // columns))
    colour = images.dim() == 4
    height, width = images.shape[-2:]
    label_band, gap = 12, 14  # pixels above each image for its two lines, between columns
    cell_h, cell_w = height + label_band, width + gap
    # Grayscale: 0 = white under gray_r, as the datasets' ink on paper; colour: RGB on white.
    canvas = torch.zeros(rows * cell_h, columns * cell_w, *((3,) if colour else ()))
    canvas = canvas.to(torch.uint8).fill_(255 if colour else 0)
    for slot, index in enumerate(picked):
        top, left = (slot // columns) * cell_h + label_band, (slot % columns) * cell_w + gap // 2
        image = images[index].permute(1, 2, 0) if colour else images[index]  # [H, W(, 3)]
        canvas[top : top + height, left : left + width] = image
    inch = 1.0 / 28  # per mosaic pixel: a 28 x 28 image is one inch wide
    title_in = 0.4
    fig = Figure(figsize=(columns * cell_w * inch, rows * cell_h * inch + title_in))
    axis = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_in / fig.get_figheight()))
    if colour:
        axis.imshow(canvas.numpy(), interpolation="nearest")
    else:
        axis.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    for slot, index in enumerate(picked):
        predicted = int(predictions[index])
        probability = float(log_probs[index, predicted].exp())
        axis.text(
            (slot % columns) * cell_w + cell_w / 2 - 0.5,
            (slot // columns) * cell_h + label_band - 1,
            f"true: {class_names[int(labels[index])]}\n"
            f"pred: {class_names[predicted]} ({probability:.2f})",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if not picked:
        axis.text(columns * cell_w / 2, cell_h / 2, "no misclassified test images", ha="center")
    fig.suptitle(
        f"{title}: first {len(picked)} of {len(wrong)} misclassified test images", fontsize=10
    )
    return fig

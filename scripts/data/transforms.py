"""Dictionary transforms the bundle needs beyond MONAI's own: channel-count normalisation, a fast argmax, a fast hole
filling, input checks.

Each check raises one ValueError naming the offending file, so a bad item in a datalist is found at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

__all__ = [
    "ArgMaxd",
    "AsChannelsd",
    "CheckLabelRanged",
    "CheckMinSized",
    "FillHolesd",
    "channel_argmax",
    "fill_holes",
    "source_name",
]


def source_name(data: Mapping, key: Hashable) -> str:
    """The file an item's array came from (MetaTensor meta), else the datalist entry, else the key."""
    value = data.get(key)
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj") or data.get(f"{key}_path") or key)


def channel_argmax(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch.argmax(x, dim, keepdim=True)`` (first maximum on ties) computed as ``x.max(dim).indices``.

    PyTorch's CPU argmax over a short leading axis is several times slower than max (docs/benchmark.md), and it runs
    on every image in evaluation and inference.
    """
    return x.max(dim=dim, keepdim=True).indices


class ArgMaxd(MapTransform):
    """Class probabilities or logits (C, ...) -> class indices (1, ...) as float, like ``AsDiscreted(argmax=True)``."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = convert_to_dst_type(channel_argmax(d[key], 0), d[key], dtype=torch.float32)[0]
        return d


def fill_holes(labels: np.ndarray, applied_labels: Sequence[int]) -> np.ndarray:
    """Class indices ``(1, *spatial)`` with the holes of each applied label filled: MONAI's ``fill_holes`` (full
    connectivity), the same result computed by labelling instead of a flood fill.

    A hole of label L is a connected region of other values (8-connected in 2D) that does not touch the image's
    border; it becomes L. MONAI floods the non-L pixels from the border by repeated binary dilation; one
    connected-component labelling and a lookup of the components on the border give the same regions several times
    faster (docs/benchmark.md), and this runs on every image of inference and evaluation. A hole lies inside its
    label's bounding box without touching the box's border, so the labelling runs on that box only (the same
    regions: a head is a fraction of an ultrasound frame).
    """
    out = np.array(labels, copy=True)
    image = out[0]
    structure = ndimage.generate_binary_structure(image.ndim, image.ndim)
    for label in set(applied_labels):  # the order MONAI fills them in
        box = ndimage.find_objects((image == label).view(np.uint8))
        if not box:  # the label is absent: no holes
            continue
        region = image[box[0]]  # a view: filling it fills out
        components, n = ndimage.label(region != label, structure=structure)
        open_ = np.zeros(n + 1, bool)
        open_[0] = True  # the label's own pixels
        for axis in range(region.ndim):
            for end in (0, -1):
                open_[np.take(components, end, axis=axis)] = True
        region[~open_[components]] = label
    return out


class FillHolesd(MapTransform):
    """``monai.transforms.FillHolesd`` on class-index maps (1, ...), through :func:`fill_holes`."""

    def __init__(self, keys: KeysCollection, applied_labels: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = list(applied_labels)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = d[key].detach().cpu().numpy() if isinstance(d[key], torch.Tensor) else np.asarray(d[key])
            d[key] = convert_to_dst_type(fill_holes(array, self.applied_labels), d[key])[0]
        return d


class AsChannelsd(MapTransform):
    """Give a channel-first image exactly ``channels`` channels: grey is repeated, RGBA loses alpha, RGB -> grey
    averages.

    Ultrasound is grey but the paper's networks take 3 channels; PACS exports are often RGB.
    """

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == 4:  # RGBA / LA saved PNGs
                img, c = img[:3], 3
            if c == 2:
                img, c = img[:1], 1
            if c not in (1, 3):
                raise ValueError(
                    f"{source_name(d, key)}: expected 1, 3 or 4 channels, got {c} (shape {tuple(img.shape)})"
                )
            if c != self.channels:
                img = img.repeat(3, *([1] * (img.ndim - 1))) if c == 1 else img.mean(dim=0, keepdim=True)
            d[key] = img
        return d


class CheckLabelRanged(MapTransform):
    """Fail with the file name when a label holds values outside {0, ..., num_classes - 1} or non-integers."""

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            values = torch.unique(label)
            bad = values[(values < 0) | (values >= self.num_classes) | (values != torch.round(values))]
            if bad.numel():
                shown = ", ".join(f"{v:g}" for v in bad[:8].tolist())
                raise ValueError(
                    f"{source_name(d, key)}: label values {{{shown}}} are outside the class range 0..{self.num_classes - 1}"  # noqa: E501
                    " (a mask must hold class indices; HC18 outlines must be filled by `python -m scripts.data prepare`)"  # noqa: E501
                )
            if label.shape[0] != 1:
                raise ValueError(
                    f"{source_name(d, key)}: a label must have one channel, got shape {tuple(label.shape)}"
                )
        return d


class CheckMinSized(MapTransform):
    """Fail with the file name when an image's spatial size is below ``min_size`` (too small to resample faithfully)."""

    def __init__(self, keys: KeysCollection, min_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = tuple(int(s) for s in min_size)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            size = tuple(d[key].shape[1:])
            if any(s < m for s, m in zip(size, self.min_size)):
                raise ValueError(
                    f"{source_name(d, key)}: image size {size} is smaller than the minimum {self.min_size} for this network"  # noqa: E501
                )
        return d

"""Layer 2, data: data-set readers, the synthetic HC18 phantom, the subject-grouped datalist and the bundle's own
MONAI transforms (``transforms``). It may import ``scripts.utils``, ``scripts.networks`` and ``scripts.evaluation``."""

from .datalist import prepare_dataset, split_subjects
from .hc18 import ellipse_circumference, fill_outline, list_hc18, load_hc18_mask, read_hc18_csv
from .phantom import (
    PHANTOM_FOLDERS,
    PHANTOM_SUBJECTS,
    ellipse_mask,
    ellipse_outline,
    generate_phantom,
    save_phantom_montage,
)

__all__ = [
    "PHANTOM_FOLDERS",
    "PHANTOM_SUBJECTS",
    "ellipse_circumference",
    "ellipse_mask",
    "ellipse_outline",
    "fill_outline",
    "generate_phantom",
    "list_hc18",
    "load_hc18_mask",
    "prepare_dataset",
    "read_hc18_csv",
    "save_phantom_montage",
    "split_subjects",
]

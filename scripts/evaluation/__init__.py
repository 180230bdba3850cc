"""Layer 1, evaluation: segmentation metrics in pixels and millimetres (``metrics``) and the biometry of a mask,
its ellipse fit, circumference and quality flags (``biometry``). It may import only ``scripts.utils``; it does not
import ``scripts.networks``, its sibling at layer 1."""

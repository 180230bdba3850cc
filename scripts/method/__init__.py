"""Layer 3, method: the semi-supervised training of the two networks, with its losses and unsupervised terms, the
trainer, the training settings and checks, the training and evaluation handlers, the diagnostics, the best-model
publisher and the Swin-Unet pre-training (SimMIM). It may import the layers below: ``scripts.utils``,
``scripts.networks``, ``scripts.evaluation`` and ``scripts.data``."""

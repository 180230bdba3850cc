"""Layer 6, experiments: the method comparison runner (``compare``) and the speed and memory benchmarks
(``benchmark``). It may import every layer below (``scripts.utils`` to ``scripts.clinical``) but not
``scripts.tools``, its sibling at layer 6."""

"""Layer 6, tools: building MONAI Label's own virtual environment (``monailabel_venv``). It may import every layer
below (``scripts.utils`` to ``scripts.clinical``) but not ``scripts.experiments``, its sibling at layer 6."""

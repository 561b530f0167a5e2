"""edgemart: the composition root (CLI, demo, bench runner). Domain code lives in drm, edge_runtime,
packagers, licenses and store."""

__version__ = "0.1.0"

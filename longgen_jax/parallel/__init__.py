"""Device meshes, the load-balanced sequence layout, context-parallel attention, multi-process launch."""

"""The parallel room: the device mesh and shardings (context parallelism will live here)."""

"""Process-level JAX setup shared by the CLIs and the training loop (multi-host initialize() will join it)."""

from __future__ import annotations

import os

import jax

DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "longgen_jax", "jax_compile")


def enable_compile_cache(directory: str = "auto") -> str | None:
  """Turns on JAX's persistent compilation cache, so a re-run (a resume, the next generate call) skips
  compiles that took over a second. "auto": $LONGGEN_JAX_COMPILE_CACHE or ~/.cache/longgen_jax/jax_compile;
  "" leaves it off. A directory the process already configured (e.g. by JAX_COMPILATION_CACHE_DIR) wins.
  Returns the directory in use."""
  current = jax.config.jax_compilation_cache_dir
  if current or not directory:
    return current or None
  if directory == "auto":
    directory = os.environ.get("LONGGEN_JAX_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory

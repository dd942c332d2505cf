"""The training room: config schema, optimizer, loss, step, FLOPs, state, checkpoints, metrics, loop."""

from longgen_jax.training.config import (build_model_config, default_config, load_config_file, load_config_module,
                                         validate_config)
from longgen_jax.training.loop import TrainingDiverged, prepare, train

__all__ = ["TrainingDiverged", "build_model_config", "default_config", "load_config_file", "load_config_module",
           "prepare", "train", "validate_config"]

"""Models: the built-ins (``mlp``, ``resnet``, ``transformer``: one module each), user entry
points (``building``), and the flat-buffer view of parameters and buffers (``flat``)."""

from sgdjob.models.building import ModelError, build_model, model_kwargs, parameter_count
from sgdjob.models.flat import FlatModel

__all__ = ["FlatModel", "ModelError", "build_model", "model_kwargs", "parameter_count"]

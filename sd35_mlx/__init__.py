"""sd35_mlx: Stable Diffusion 3 / 3.5 (Large, Large Turbo, Medium) in MLX.

Public API: `SD35Pipeline` (+ `LoadOptions`), `GenerationSettings`, `SkipLayerSettings`, the component loaders
`load_transformer`, `load_vae`, `load_text_encoders`, `load_tokenizers`, and the step
types `StepInfo` / `GenerationInterrupted`.
"""

from . import images
from ._version import __version__
from .callbacks import GenerationInterrupted, StepInfo
from .errors import InputError, SD35Error, WeightFileError, WeightMappingError
from .loading import load_text_encoders, load_tokenizers, load_transformer, load_vae
from .hub import resolve_model_path
from .load_options import LoadOptions
from .pipeline import GeneratedImage, PromptEmbeddings, SD35Pipeline
from .settings import GenerationSettings, SkipLayerSettings

__all__ = [
    "__version__", "SD35Pipeline", "LoadOptions", "GenerationSettings", "SkipLayerSettings", "GeneratedImage", "PromptEmbeddings",
    "StepInfo", "GenerationInterrupted", "load_transformer", "load_vae", "load_text_encoders",
    "load_tokenizers", "resolve_model_path", "images", "SD35Error", "InputError", "WeightFileError", "WeightMappingError",
]  # fmt: skip

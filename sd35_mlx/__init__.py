"""sd35_mlx: Stable Diffusion 3 / 3.5 (Large, Large Turbo, Medium) in MLX.

Public API: `SD35Pipeline`, `GenerationSettings`, `SkipLayerSettings`, the component loaders
`load_transformer`, `load_vae`, `load_text_encoders`, `load_tokenizers`, and the step
types `StepInfo` / `GenerationInterrupted`.
"""

__version__ = "0.1.0"

from . import images  # noqa: E402
from .callbacks import GenerationInterrupted, StepInfo  # noqa: E402
from .errors import InputError, SD35Error, WeightFileError, WeightMappingError  # noqa: E402
from .loading import load_text_encoders, load_tokenizers, load_transformer, load_vae  # noqa: E402
from .hub import resolve_model_path  # noqa: E402
from .pipeline import GeneratedImage, PromptEmbeddings, SD35Pipeline  # noqa: E402
from .settings import GenerationSettings, SkipLayerSettings  # noqa: E402

__all__ = [
    "SD35Pipeline", "GenerationSettings", "SkipLayerSettings", "GeneratedImage", "PromptEmbeddings",
    "StepInfo", "GenerationInterrupted", "load_transformer", "load_vae", "load_text_encoders",
    "load_tokenizers", "resolve_model_path", "images", "SD35Error", "InputError", "WeightFileError", "WeightMappingError",
]  # fmt: skip

"""Errors users see. Each message says what is wrong and what to do."""


class SD35Error(Exception):
    """Base class of every error sd35_mlx raises on purpose."""


class WeightFileError(SD35Error, ValueError):
    """A weight file cannot be read: missing, truncated, corrupt, or not safetensors."""


class WeightMappingError(SD35Error, ValueError):
    """A checkpoint's tensors do not fit the network: missing, unexpected or mis-shaped keys."""


class InputError(SD35Error, ValueError):
    """A generation or conversion argument is invalid."""


class CLIPProjectionWarning(UserWarning):
    """A CLIP-L's `text_projection` is not the identity, so its pooled vector differs from
    Stability's reference (which uses the unprojected vector). Filter it with
    `warnings.filterwarnings("ignore", category=CLIPProjectionWarning)`."""


class DistributedError(SD35Error, RuntimeError):
    """Another rank of a distributed run (mx.distributed) was lost: it died or stopped answering."""

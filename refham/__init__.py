"""refham: the reference implementation of hierarchical associative memories (HAM) and the
MLP-Mixers derived from them, in plain NumPy/CuPy array code with hand-written gradients."""
from refham.backend import set_backend, set_dtype, get_dtype, to_numpy, xp

__version__ = "0.1.0"
__all__ = ["set_backend", "set_dtype", "get_dtype", "to_numpy", "xp", "__version__"]

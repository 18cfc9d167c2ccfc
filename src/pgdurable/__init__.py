__version__ = "0.2.0.dev0"

from .python_steps import StepContext, step

__all__ = ["StepContext", "__version__", "step"]

"""pgdurable: durable execution inside PostgreSQL (docs/python.md for the Python API)."""

__version__ = "0.2.0.dev0"

from . import dsl
from .client import AsyncClient, Client, InstanceNotFound, WorkflowFailed
from .python_steps import StepContext, step

__all__ = [
    "AsyncClient",
    "Client",
    "InstanceNotFound",
    "StepContext",
    "WorkflowFailed",
    "__version__",
    "dsl",
    "step",
]

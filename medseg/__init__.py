"""medseg: medical-image segmentation building blocks on MONAI and PyTorch.

The library holds building blocks only (data, transforms, networks, losses, metrics, inference,
the training engine and the MLflow adapter); the workflows and the CLI live in ``pipelines``.
"""

__version__ = "0.1.0"

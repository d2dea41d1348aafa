"""detflow: transfer-learning object detection pipeline for medical imaging.

Importing this package has no side effects (no folders created, no logging configured).
"""

__version__ = "0.1.0"

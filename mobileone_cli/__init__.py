"""mobileone: fold train-time MobileOne checkpoints into verified, deployable models.

Importing this package is cheap: nothing here imports torch. The heavy modules
(`fold`, `model`, `verify`, the exporters) import it where they are used.
"""

__version__ = "0.1.0"

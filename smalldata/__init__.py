"""Shared code of the small-data pipeline: folders, images, model, checkpoints, training.

The five top-level scripts are thin entry points over these modules; they talk to
each other only through the files described in README.md.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

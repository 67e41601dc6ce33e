"""Formula-driven pretraining for the shipped ``restune_vit_tiny`` backbone.

``images`` renders IFS fractal categories and ``textures`` random-wave texture categories from a seed (the training
images are fractals over textures), ``model`` registers ``restune_vit_tiny`` with timm (pointing
at the weights shipped in ``restune/weights``), ``train`` pretrains it and ``probe`` checks that its features transfer.
Importing this package registers the model; ``train`` and ``probe`` are imported on demand (they are scripts).
"""

from restune.pretraining import images, model, textures
from restune.pretraining.images import FractalCategories, make_categories, render_batch
from restune.pretraining.model import MODEL_NAME, WEIGHTS
from restune.pretraining.textures import TextureCategories, make_textures, render_composites

__all__ = [
    "images",
    "model",
    "textures",
    "FractalCategories",
    "make_categories",
    "render_batch",
    "TextureCategories",
    "make_textures",
    "render_composites",
    "MODEL_NAME",
    "WEIGHTS",
]

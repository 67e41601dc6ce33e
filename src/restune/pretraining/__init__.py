"""Formula-driven pretraining for the shipped ``restune_vit_tiny`` backbone.

``images`` renders IFS fractal categories from a seed, ``model`` registers ``restune_vit_tiny`` with timm (pointing
at the weights shipped in ``restune/weights``), ``train`` pretrains it and ``probe`` checks that its features transfer.
Importing this package registers the model; ``train`` and ``probe`` are imported on demand (they are scripts).
"""

from restune.pretraining import images, model
from restune.pretraining.images import FractalCategories, make_categories, render_batch
from restune.pretraining.model import MODEL_NAME, WEIGHTS

__all__ = ["images", "model", "FractalCategories", "make_categories", "render_batch", "MODEL_NAME", "WEIGHTS"]

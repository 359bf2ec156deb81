"""Where small images begin: one threshold read by the view recipes, the backbones and the methods."""

# Up to this size the dataset is CIFAR-like and gets the papers' small-image settings.
SMALL_IMAGE_MAX = 64  # at or below: the papers' CIFAR recipes (crops, stems, patch grid, blur)

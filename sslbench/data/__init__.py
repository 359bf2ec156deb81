"""Images in, views out: datasets (the embedded subset, CIFAR-10, image folders), image files, seeded
sampling, the view recipes (``augment``) and their batched GPU form (``gpu_augment``, ``gpu_photometric``,
``image_canvas``). Reads only ``sslbench.base``."""

"""Frozen-feature evaluation: features extracted once (``features``), k-NN and the linear probe, the
k-NN monitor during training, collapse diagnostics and attention maps. Never imports training."""

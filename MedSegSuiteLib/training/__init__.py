"""Training: losses, datasets, augmentation, supervised and semi-supervised loops."""

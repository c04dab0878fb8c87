"""Preprocessing: one module from a decoded image to model input, and batch augmentation for training."""

"""The gray-input model, its checkpoints, Grad-CAM, and the seam from a run folder to a scorer."""

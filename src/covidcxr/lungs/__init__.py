"""Lung fields: a template heuristic and a small learned U-Net, and the boxes around them."""

"""Deployment: predicting files, the HTTP service, and exported models."""

"""Evaluations of a trained model, outside the training loop: ``validate`` (evaluate.py), the frozen-feature
protocols (features.py: extraction and tokens; knn.py, linear.py, semisup.py, transfer.py) and their commands.
Video label propagation is in ``dense/video.py``."""

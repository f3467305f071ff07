"""Small, reproducible studies that run on CPU (``python -m visionzoo.studies.<name> --help``)."""

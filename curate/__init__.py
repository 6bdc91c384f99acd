"""curate: curate web-scale image-text datasets on Ray."""

__version__ = "0.1.0"

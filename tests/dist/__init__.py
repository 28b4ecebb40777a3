"""Scripts run under torchrun by the distributed tests, and the launcher they share (``launch.py``)."""

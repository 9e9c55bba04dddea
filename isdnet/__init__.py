"""ISDNet: importance-guided semi-supervised adversarial segmentation of medical volumes."""

__version__ = "0.1.0"
# The method, for the modules' acknowledgements and the README.
PAPER = ("Ning Q, Zhao X, Qian D. ISDNet: Importance Guided Semi-supervised Adversarial Learning for Medical Image "
         "Segmentation. Lecture Notes in Computer Science, Springer")
PAPER_URL = ("https://scholar.google.com/scholar?q=ISDNet+Importance+Guided+Semi-supervised+Adversarial+Learning"
             "+for+Medical+Image+Segmentation")

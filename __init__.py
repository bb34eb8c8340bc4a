"""tdr: image restoration guided by degradation-free textual representations.

Implements "Improving Image Restoration through Removing Degradations in Textual Representations"
(Lin et al., CVPR 2024). ``tdr.pipeline`` makes guidance images, ``tdr.cache`` stores them, ``tdr.guided``
trains restoration networks that use them.
"""

__version__ = "0.1.0"

"""Training data: the Real-ESRGAN degradation and the datasets."""

"""Paths of the tiny models the training tests train."""

from helpers import OSEDIFF_PARITY, TADSR_PARITY, TSDSR_PARITY

TINY_SD21 = OSEDIFF_PARITY / "tiny-sd21"
OSEDIFF_WEIGHTS = OSEDIFF_PARITY / "osediff_tiny.pkl"
TINY_SD3 = TSDSR_PARITY / "tiny-sd3"
TSDSR_WEIGHTS = TSDSR_PARITY / "lora"
TSDSR_EMBEDDINGS = TSDSR_PARITY / "embeddings"
TINY_VQ = TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth"
TADSR_WEIGHTS = TADSR_PARITY / "models" / "tadsr_tiny_A.pth"

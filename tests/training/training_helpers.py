"""Paths of the tiny models the training tests train."""

import os

from helpers import OSEDIFF_PARITY, TADSR_PARITY, TSDSR_PARITY

TINY_SD21 = OSEDIFF_PARITY / "tiny-sd21"
OSEDIFF_WEIGHTS = OSEDIFF_PARITY / "osediff_tiny.pkl"
TINY_SD3 = TSDSR_PARITY / "tiny-sd3"
TSDSR_WEIGHTS = TSDSR_PARITY / "lora"
TSDSR_EMBEDDINGS = TSDSR_PARITY / "embeddings"
TINY_VQ = TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth"
TADSR_WEIGHTS = TADSR_PARITY / "models" / "tadsr_tiny_A.pth"

# the device the training parity tests run on: the CPU in CI; `ONESTEP_SR_TRAIN_TEST_DEVICE=cuda` on a GPU machine
# (TF32 is turned off there by conftest.py: the tolerances are fp32's)
TRAIN_TEST_DEVICE = os.environ.get("ONESTEP_SR_TRAIN_TEST_DEVICE", "cpu")

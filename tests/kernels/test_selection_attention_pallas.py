"""The Pallas Triton and Mosaic TPU kernels, in interpret mode on CPU, against the shared suite."""

from tests.kernels.selection_attention_suite import SelectionAttentionSuite


class TestTritonInterpret(SelectionAttentionSuite):
  IMPLEMENTATION = "triton"
  INTERPRET = True


class TestMosaicTpuInterpret(SelectionAttentionSuite):
  IMPLEMENTATION = "mosaic_tpu"
  INTERPRET = True

"""A backend chosen in `Backends` reaches each op (selection attention, block top-k, segment
attention): through `chunk_self_attention`, through the model call and through `Rollout`.

`omnimem_kernels.dispatch.recording()` collects, per op, the backends `dispatch` ran while tracing.
On CPU the Pallas backends run in interpret mode (Triton for selection and top-k, Mosaic TPU for
selection, splash for the dense op); "mosaic_gpu" refuses, so a preference list falls through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimem_kernels import dispatch
from omnimem_kernels.backends import Backends
from omnimem_jax.config import SamplerConfig
from omnimem_jax.memory import store
from omnimem_jax.model.attention import chunk_self_attention
from omnimem_jax.model.wan import CausalWanModel
from omnimem_jax.rollout import Rollout
from tests.configs import tiny

# Backends chosen -> the backend each op runs on CPU. Every op differs from the defaults in some choice.
CHOICES = {
    "defaults": (Backends(), {"selection_attention": "xla", "block_topk": "xla", "segment_attention": "xla"}),
    "pallas": (Backends(selection="triton", topk="triton", dense="splash"),
               {"selection_attention": "triton", "block_topk": "triton", "segment_attention": "splash"}),
    "preference_lists": (Backends(selection="mosaic_tpu", topk=("triton", "xla"), dense=("mosaic_gpu", "splash")),
                         {"selection_attention": "mosaic_tpu", "block_topk": "triton", "segment_attention": "splash"}),
}
OPS = ("selection_attention", "block_topk", "segment_attention")

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the expected records are CPU's")


def ran(record: dict[str, set[str]]) -> dict[str, set[str]]:
  """The record of the three ops `Backends` chooses for."""
  return {op: record.get(op, set()) for op in OPS}


def expected(name: str) -> dict[str, set[str]]:
  return {op: {backend} for op, backend in CHOICES[name][1].items()}


def test_the_choices_give_different_records():
  records = [tuple(sorted(ops.items())) for _, ops in CHOICES.values()]
  assert len(set(records)) == len(records)
  for op in OPS:  # each op's backend changes in some choice
    assert len({ops[op] for _, ops in CHOICES.values()}) > 1


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_chunk_self_attention(name):
  config = tiny()
  kv = store.init_store(config, 1, jnp.float32, num_layers=2)
  rng = np.random.default_rng(0)
  shape = (1, config.tokens_per_chunk, config.num_heads, config.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  gates = jnp.asarray(rng.standard_normal((*shape[:3], 3)), jnp.float32)
  step = jax.jit(lambda layers, chunk: chunk_self_attention(q, k, v, layers, kv.tables, chunk, gates, config,
                                                            backends=CHOICES[name][0], layer_index=1))
  with dispatch.recording() as record:
    step.lower(kv.layers, jnp.int32(0))
  assert ran(record) == expected(name)


def _model(mode: str = "omnimem") -> CausalWanModel:
  return CausalWanModel(tiny(mode=mode, capacity_chunks=4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_model_call(name):
  model = _model()
  config = model.config
  graphdef, params = nnx.split(model)
  latents = jax.random.normal(jax.random.key(1), (1, config.in_channels, config.memory.frames_per_chunk,
                                                  config.latent_height, config.latent_width))
  text = jax.random.normal(jax.random.key(2), (1, config.text_len, config.text_dim))
  call = jax.jit(lambda params, kv: nnx.merge(graphdef, params)(latents, jnp.full((1,), 500.0), text, kv, 2,
                                                                backends=CHOICES[name][0]))
  with dispatch.recording() as record:
    call.lower(params, store.init_store(config, 1, jnp.float32))
  assert ran(record) == expected(name)


def test_dense_choice_reaches_the_baseline_modes():
  """Outside omnimem mode only the dense op runs, on the chosen backend."""
  model = _model("window")
  config = model.config
  graphdef, params = nnx.split(model)
  latents = jax.random.normal(jax.random.key(1), (1, config.in_channels, config.memory.frames_per_chunk,
                                                  config.latent_height, config.latent_width))
  text = jax.random.normal(jax.random.key(2), (1, config.text_len, config.text_dim))
  for dense in ("xla", "splash"):
    call = jax.jit(lambda params, kv, dense=dense: nnx.merge(graphdef, params)(
        latents, jnp.zeros((1,)), text, kv, 0, backends=Backends(dense=dense)))
    with dispatch.recording() as record:
      call.lower(params, store.init_store(config, 1, jnp.float32))
    assert ran(record) == {"selection_attention": set(), "block_topk": set(), "segment_attention": {dense}}


def test_rollout():
  """One-chunk rollouts (denoising calls and context pass) run the chosen backends; the Pallas
  backends' video agrees with the defaults' to float32 rounding."""
  model = _model()
  text = jax.random.normal(jax.random.key(3), (1, model.config.text_len, model.config.text_dim))
  videos = {}
  for name in ("defaults", "pallas"):
    rollout = Rollout(model, SamplerConfig(), store_dtype=jnp.float32, backends=CHOICES[name][0], retrieval=True)
    with dispatch.recording() as record:
      videos[name], _ = rollout.run([(0, model.cross_kv(text))], num_chunks=1, seed=0)
    assert ran(record) == expected(name)
  np.testing.assert_allclose(videos["pallas"], videos["defaults"], rtol=1e-4, atol=1e-4)

"""The memory plan (omnimem_jax/budget.py): every part equals the bytes the code allocates; a run that
cannot fit is refused (exit code 2, the numbers and settings that would fit) before any weights load; JAX's
GPU pool fraction is raised unless the user chose one."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from safetensors.numpy import load_file

from omnimem_jax import budget, environment, sharding
from omnimem_jax.checkpoints import CheckpointError
from omnimem_jax.config import MemoryConfig, ModelConfig, store_bytes
from omnimem_jax.generation import plan as planning
from omnimem_jax.generation import run
from omnimem_jax.generation.options import DoesNotFit, GenerateError, GenerateOptions
from omnimem_jax.memory import store
from omnimem_jax.model.vae import VAEConfig
from omnimem_jax.model.wan import CausalWanModel, count_parameters
from omnimem_jax.rollout import RolloutConfig, generate_segment, initial_state
from tests.configs import require_devices, tiny
from tests.tiny_models import DIT_WEIGHTS, FIXTURES, save_dit

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "JAX_PLATFORMS": "cpu"}
BIG = budget.Capacity(10**12, "test", "cpu")  # room for every tiny run


def _nbytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _fixture_parameters(path: Path) -> int:
  """Parameters in a safetensors file (the tiny models' source weights)."""
  return sum(array.size for array in load_file(path).values())


def _parts(plan: budget.MemoryPlan | list[budget.Part]) -> dict[str, budget.Part]:
  return {part.name: part for part in (plan.parts if isinstance(plan, budget.MemoryPlan) else plan)}


def test_parts_are_the_bytes_the_code_allocates():
  """Weights, each KV tier, the rollout state, cross K/V and the VAE: against arrays the code allocates, and
  by hand."""
  config, vae_config, batch = tiny(capacity_chunks=5), VAEConfig.from_preset("tiny"), 2
  shape = budget.RunShape(dits=(budget.DiT(config, "bfloat16"),), batch_size=batch, dtype="float32", prompts=3,
                          recache_chunks=4, vae=vae_config)
  parts = _parts(budget.static_parts(shape))
  heads, layers, dim, tokens, blocks, head_dim = 4, 2, 64, 96, 24, 16  # tiny: 4 x 8 tokens a frame, 2 x 2 blocks
  gates = layers * (dim * 3 * heads + 3 * heads)
  assert parts["weights"].bytes == 2 * (_fixture_parameters(DIT_WEIGHTS) + gates)  # bfloat16
  kv = store.init_store(config, batch, jnp.float32)
  full, pooled, tables = (parts[f"KV store: {name}"] for name in ("full resolution", "pooled", "slot tables"))
  assert full.bytes == kv.layers.k.nbytes + kv.layers.v.nbytes == 2 * batch * heads * layers * 5 * tokens * head_dim * 4
  assert pooled.bytes == 2 * batch * heads * layers * 5 * blocks * head_dim * 4
  assert full.bytes + pooled.bytes == _nbytes(kv.layers) == store_bytes(config, batch, 4)
  assert tables.bytes == _nbytes(kv.tables) == (5 + 5) * 4  # full and pooled tables; no recent ring
  assert [(part.chunks, part.dtype) for part in (full, pooled)] == [(5, "float32"), (5, "float32")]
  assert "KV store: recent ring" not in parts and "KV store: scales" not in parts  # a plain store has none
  assert full.bytes_per_chunk + pooled.bytes_per_chunk == store_bytes(tiny(capacity_chunks=6), batch, 4) - store_bytes(
      config, batch, 4)
  rollout = RolloutConfig(batch_size=batch, store_dtype=jnp.float32)
  state = initial_state(budget.abstract_dit(shape.dits[0], "float32"), rollout, jax.random.key(0), 4)  # zeros
  assert parts["rollout state"].bytes == _nbytes(state) - _nbytes(kv) == 4 * batch * 4 * 3 * 8 * 16 * 4 + 4 * 4 + (
      8 + 4 + 4)  # recent latents [4, B, C, 3, h, w] f32, their chunk ids, the key, next and non-finite chunk
  assert parts["cross K/V (3 prompts)"].bytes == 3 * 2 * layers * batch * config.text_len * dim * 4
  assert parts["VAE weights"].bytes == 4 * _fixture_parameters(FIXTURES / "vae_tiny_diffusers.safetensors")
  cache = budget.abstract_vae(vae_config).init_decode_cache(batch, 8, 16)  # zeros: needs no weights
  assert parts["VAE decode cache"].bytes == _nbytes(cache) > 0


def test_the_working_set_is_the_compiled_rollout_segments():
  """The DiT step's working set equals the temp bytes of `generate_segment` jitted over a real model's
  weights and a real state (the rollout's segment function, built here by hand); weights and cross K/V equal
  the real model's."""
  config = tiny(capacity_chunks=6)
  shape = budget.RunShape(dits=(budget.DiT(config, "float32", retrieval=True),), batch_size=1, dtype="float32")
  planned = _parts(budget.plan_memory(shape, BIG))
  model = CausalWanModel(config, rngs=nnx.Rngs(0))
  rollout = RolloutConfig(store_dtype=jnp.float32, retrieval=True)
  graphdef, params = nnx.split(model)
  state = initial_state(model, rollout, jax.random.key(0), 7)
  cross = model.cross_kv(jnp.zeros((1, config.text_len, config.text_dim)))
  assert planned["weights"].bytes == _nbytes(params) == 4 * count_parameters(model)
  assert planned["cross K/V (1 prompt)"].bytes == _nbytes(cross)
  segment = jax.jit(lambda params, state, cross: generate_segment(nnx.merge(graphdef, params), state, cross, rollout,
                                                                  1), donate_argnums=1)
  compiled = segment.lower(params, state, cross).compile()
  step = planned["working set: DiT step"]
  assert step.transient and step.bytes == compiled.memory_analysis().temp_size_in_bytes > 0


def test_a_mesh_divides_the_sharded_parts():
  """Per device on a (2, 2) mesh: the shards `sharding` places, of real arrays."""
  require_devices(4)
  config = tiny()
  mesh = sharding.make_mesh(2, 2)
  shape = budget.RunShape(dits=(budget.DiT(config, "float32"),), batch_size=2, dtype="float32", mesh=(2, 2))
  parts = _parts(budget.static_parts(shape))
  model = sharding.shard_module(CausalWanModel(config, rngs=nnx.Rngs(0)), mesh)
  kv = jax.device_put(store.init_store(config, 2, jnp.float32), sharding.tree_shardings(mesh, store.LOGICAL_AXES))

  def first_shards(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))

  assert parts["weights"].bytes == first_shards(nnx.state(model)) < _nbytes(nnx.state(model))
  tiers = sum(parts[f"KV store: {name}"].bytes for name in ("full resolution", "pooled"))
  assert tiers == first_shards(kv.layers) == _nbytes(kv.layers) // 4
  assert parts["KV store: slot tables"].bytes == _nbytes(kv.tables)  # replicated


def test_the_totals_summary_and_table():
  parts = (budget.Part("weights", "weights", 2_800_000_000, "bfloat16"),
           budget.Part("KV store: full resolution", "KV store", 80_000_000_000, "bfloat16", 80, 10**9),
           budget.Part("KV store: slot tables", "KV store", 320, "int32"),
           budget.Part("working set: DiT step", "working set", 8_300_000_000, transient=True),
           budget.Part("working set: VAE decode", "working set", 5_000_000_000, transient=True))
  plan = budget.MemoryPlan(parts, budget.Capacity(79_600_000_000, "bytes_limit, XLA_PYTHON_CLIENT_MEM_FRACTION=0.97",
                                                  "NVIDIA H100 80GB HBM3"), devices=1, measure_seconds=1.0)
  assert plan.total == 2_800_000_000 + 80_000_000_320 + 8_300_000_000 and not plan.fits()
  assert plan.summary() == ("the run needs 91.1 GB on NVIDIA H100 80GB HBM3 (79.6 GB: bytes_limit, "
                            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.97): weights 2.8, KV store 80.0 (80 chunks), "
                            "working set 8.3")
  assert plan.table().splitlines() == [
      "memory plan on NVIDIA H100 80GB HBM3 (79.6 GB: bytes_limit, XLA_PYTHON_CLIENT_MEM_FRACTION=0.97):",
      "  weights                       2.8 GB  bfloat16",
      "  KV store: full resolution    80.0 GB  bfloat16, 80 chunks",
      "  KV store: slot tables          320 B  int32",
      "  working set: DiT step         8.3 GB  compiled temp bytes; the larger working set counts",
      "  working set: VAE decode       5.0 GB  compiled temp bytes; the larger working set counts",
      "  total                        91.1 GB  does NOT fit"]
  assert budget.format_bytes(999) == "999 B" and budget.format_bytes(1500) == "1.5 kB"


def test_more_devices_that_fit():
  """The smallest model axis whose per-device weights and store (plus the measured working set) fit."""
  shape = budget.RunShape(dits=(budget.DiT(tiny(capacity_chunks=40), "float32"),), batch_size=1, dtype="float32")
  steps = 10**6
  plan = budget.MemoryPlan((*budget.static_parts(shape), budget.Part("working set: DiT step", "working set", steps,
                                                                      transient=True)), BIG, 1, 0.0)
  per_device = {model: sum(part.bytes for part in budget.static_parts(budget.RunShape(
      dits=shape.dits, batch_size=1, dtype="float32", mesh=(1, model)))) + steps for model in (2, 4)}
  assert plan.total > per_device[2] > per_device[4]
  tight = budget.MemoryPlan(plan.parts, budget.Capacity(per_device[4], "test", "gpu"), 1, 0.0)
  assert budget.model_axis_that_fits(shape, tight) == 4
  shared = budget.MemoryPlan(plan.parts, budget.Capacity(per_device[2], "test", "cpu", shared=True), 1, 0.0)
  assert budget.model_axis_that_fits(shape, shared) is None  # a CPU's devices share the host's memory


def test_robust_device_capacity_and_a_bad_limit(monkeypatch, tmp_path):
  monkeypatch.setenv(budget.CAPACITY_VARIABLE, "123456")
  assert budget.device_capacity(4) == budget.Capacity(123456, budget.CAPACITY_VARIABLE, jax.devices()[0].device_kind)
  monkeypatch.setenv(budget.CAPACITY_VARIABLE, "lots")
  with pytest.raises(GenerateError, match="^OMNIMEM_DEVICE_MEMORY_BYTES='lots' must be a whole number of bytes$"):
    planning.plan(GenerateOptions(num_frames=9, output=str(tmp_path / "out.mp4")))
  monkeypatch.delenv(budget.CAPACITY_VARIABLE)
  if jax.devices()[0].platform == "cpu":
    capacity = budget.device_capacity(2)
    assert capacity.shared and capacity.source == "the host's MemAvailable / 2 devices"
    assert abs(capacity.bytes - budget.host_available_bytes() // 2) < 2**30  # the host's memory moves a little


def test_robust_a_run_that_cannot_fit_is_refused_before_its_weights_load(tmp_path, monkeypatch):
  """A checkpoint whose array data is garbled (its metadata intact): the refusal comes from the plan, with
  the numbers and settings that fit, and those settings are accepted; only a run that fits reads (and here
  fails on) the weights."""
  checkpoint = save_dit(tmp_path / "dit", tiny())
  for data in (checkpoint / "params" / "ocdbt.process_0" / "d").iterdir():
    data.write_bytes(b"\0" * data.stat().st_size)
  options = GenerateOptions(checkpoint=str(checkpoint), dtype="float32", output=str(tmp_path / "out.mp4"))  # 14 chunks
  fitting = planning.plan(options).memory
  per_chunk = sum(part.bytes_per_chunk for part in fitting.parts)
  monkeypatch.setenv(budget.CAPACITY_VARIABLE, str(fitting.total - 5 * per_chunk))
  with pytest.raises(DoesNotFit) as refused:
    planning.plan_runs(options)
  message = str(refused.value)
  device = re.escape(jax.devices()[0].device_kind)
  numbers = re.fullmatch(rf"the run needs (\S+) MB on {device} \((\S+) MB: OMNIMEM_DEVICE_MEMORY_BYTES\): weights "
                         r"(\S+), KV store (\S+) \(14 chunks\), working set \S+; try --kv_dtype=fp8 or "
                         r"--seconds=(\S+)", message)
  assert numbers, message
  kv = store_bytes(tiny(capacity_chunks=14), 1, 4) + 2 * 14 * 4  # the full and pooled slot tables: 14 int32 each
  assert list(numbers.groups()[:4]) == [f"{size / 1e6:.1f}" for size in (
      fitting.total, fitting.total - 5 * per_chunk, _parts(fitting)["weights"].bytes, kv)]
  assert refused.value.table.splitlines()[-1].endswith("does NOT fit")
  assert planning.plan(dataclasses.replace(options, kv_dtype="fp8")).memory.fits()
  seconds = float(numbers[5])
  shorter = planning.plan(dataclasses.replace(options, seconds=seconds))
  assert shorter.memory.fits() and 3 <= shorter.num_chunks == shorter.config.memory.capacity_chunks < 14
  # With the compact store asked for and still too big: a shorter video or fewer store slots.
  compact = dataclasses.replace(options, kv_dtype="fp8")
  compact_plan = planning.plan(compact).memory
  monkeypatch.setenv(budget.CAPACITY_VARIABLE, str(compact_plan.total - 5 * sum(p.bytes_per_chunk
                                                                                for p in compact_plan.parts)))
  with pytest.raises(DoesNotFit, match=r"; try --seconds=\S+ or --capacity_chunks=\d+$") as refused:
    planning.plan_runs(compact)
  slots = int(str(refused.value).rsplit("=", 1)[1])
  assert 3 <= slots < 14
  fewer_slots = planning.plan(dataclasses.replace(compact, capacity_chunks=slots))
  assert fewer_slots.memory.fits() and fewer_slots.config.memory.capacity_chunks == slots
  assert fewer_slots.num_chunks == fewer_slots.config.memory.pooled_chunks == 14  # the pooled tier keeps the video
  monkeypatch.delenv(budget.CAPACITY_VARIABLE)
  with pytest.raises(CheckpointError, match="cannot restore"):
    run.generate(options)


def test_robust_cli_refuses_the_4_minute_1_3b_video_on_this_machine(tmp_path):
  """`generate.py --preset=wan2.1-t2v-1.3b --seconds=240` with 40 GB a device: the plan on stdout, one line
  and exit 2; nothing written. 240 s = 321 chunks, float32 on a CPU."""
  env = {**ENV, budget.CAPACITY_VARIABLE: str(40 * 10**9)}
  result = subprocess.run([sys.executable, str(ROOT / "experiments/generate.py"), "--preset=wan2.1-t2v-1.3b",
                           "--seconds=240"], check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
  assert result.returncode == 2, result.stderr
  weights = (1_418_996_800 + 1_659_960) * 4  # docs/architecture.md: parameters, and the omnimem gates
  kv = store_bytes(ModelConfig(memory=MemoryConfig(capacity_chunks=321)), 1, 4)  # full resolution and pooled
  assert (f"{weights / 1e9:.1f}", f"{kv / 1e9:.1f}") == ("5.7", "572.3")
  table = result.stdout.splitlines()
  assert table[0] == "memory plan on cpu (40.0 GB: OMNIMEM_DEVICE_MEMORY_BYTES):"
  assert re.fullmatch(r"  weights +5\.7 GB  float32", table[1]), table
  assert re.fullmatch(r"  KV store: full resolution +553\.8 GB  float32, 321 chunks", table[2]), table
  assert re.fullmatch(r"  KV store: pooled +18\.5 GB  float32, 321 chunks", table[3]), table
  assert table[-1].endswith("does NOT fit")
  assert result.stderr.splitlines() == [result.stderr.strip()]
  assert re.fullmatch(r"error: the run needs \S+ GB on cpu \(40\.0 GB: OMNIMEM_DEVICE_MEMORY_BYTES\): weights 5\.7, "
                      r"KV store 572\.3 \(321 chunks\), cross K/V 0\.2, working set \S+; "
                      r"try --seconds=\S+", result.stderr.strip()), result.stderr  # fewer slots keep 18.5 GB pooled
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chosen", [{}, {"XLA_CLIENT_MEM_FRACTION": ".5"}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".6"},
                                    {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                                    {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"},
                                    {"XLA_FLAGS": "--xla_gpu_memory_fraction_policy=0.9"}])
def test_the_pool_fraction_is_raised_unless_the_user_chose(monkeypatch, chosen):
  for name in (*environment.MEMORY_POOL_VARIABLES, "XLA_FLAGS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in chosen.items():
    monkeypatch.setenv(name, value)
  environment.use_most_device_memory()
  pool = {name: os.environ.get(name) for name in (*environment.MEMORY_POOL_VARIABLES, "XLA_FLAGS")}
  expected = chosen or {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97"}
  assert {name: value for name, value in pool.items() if value is not None} == expected
  name, value = next(iter(expected.items()))
  assert environment.memory_pool_setting() == (value if name == "XLA_FLAGS" else f"{name}={value}")

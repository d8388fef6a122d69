"""Config presets, derived geometry, validation errors, and the one convention of every config class
(presets as factories, `from_dict` refusing unknown fields)."""

import dataclasses
import json

import pytest

from omnimem_jax.config import PRESETS, MemoryConfig, ModelConfig, SamplerConfig, store_bytes
from omnimem_jax.data.synthetic import WorldConfig
from omnimem_jax.model import text, vae
from omnimem_jax.model.text import TextEncoderConfig
from omnimem_jax.model.vae import VAEConfig


def test_real_preset_geometry_matches_design_table():
  config = ModelConfig.from_preset("wan2.1-t2v-1.3b")
  assert (config.head_dim, config.grid_h, config.grid_w) == (128, 30, 52)
  assert config.tokens_per_frame == 1560
  assert config.tokens_per_chunk == 4680
  assert config.memory.block_tokens == 30
  assert (config.blocks_per_frame, config.blocks_per_chunk) == (52, 156)
  assert config.groups_per_chunk == 312
  # K+V per chunk, all layers, bf16 = 0.86 GB (docs/architecture.md, 'Store layout'); the store adds pooled entries.
  per_chunk = dataclasses.replace(config, memory=dataclasses.replace(config.memory, capacity_chunks=3))
  full_res = 4680 * 1536 * 2 * 2 * 30
  assert store_bytes(per_chunk, batch_size=1) == 3 * (full_res + full_res * 156 // 4680)
  assert round(full_res / 1e9, 2) == 0.86
  # 1024 RoPE frames -> 4093 pixel frames at 16 fps.
  assert config.max_video_seconds == pytest.approx(4093 / 16)


def test_tiny_preset_is_small_and_consistent():
  config = ModelConfig.from_preset("tiny")
  assert config.tokens_per_chunk == 96
  assert config.blocks_per_chunk == 24
  assert config.groups_per_chunk == 48
  assert config.memory.top_k < config.blocks_per_chunk


def test_overrides_are_validated_again():
  with pytest.raises(ValueError, match="num_heads"):
    ModelConfig.from_preset("tiny", num_heads=5)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    ModelConfig.from_preset("huge")


@pytest.mark.parametrize("fields, match", [
    (dict(top_k=0), "'top_k': must be a positive integer"),
    (dict(group_size=4), "'group_size': must divide the block"),
    (dict(block_h=0), "'block_h'"),
    (dict(mode="sparse"), "'mode': must be one of"),
    (dict(exclude_window_chunks=-1), "'exclude_window_chunks'"),
    (dict(local_attn_frames=10), "'local_attn_frames': must be a multiple of frames_per_chunk"),
    (dict(sink_frames=2), "'sink_frames': must be a multiple"),
    (dict(mode="sink_window", local_attn_frames=3, sink_frames=3), "must exceed sink_frames"),
    (dict(capacity_chunks=2), "'capacity_chunks': must be >= 3 in omnimem mode"),
    (dict(mode="sink_window", capacity_chunks=3), "'capacity_chunks': must be >= 4 in sink_window mode"),
    (dict(mode="window", local_attn_frames=21, capacity_chunks=6), "must be >= 7 in window mode"),
])
def test_memory_config_errors_name_field_and_rule(fields, match):
  with pytest.raises(ValueError, match=match):
    MemoryConfig(**fields)


@pytest.mark.parametrize("fields, match", [
    (dict(memory=MemoryConfig(block_h=4, group_size=8)), "'memory.block_h': must tile the token grid height 30"),
    (dict(memory=MemoryConfig(block_w=3, group_size=15)), "'memory.block_w': must tile the token grid width 52"),
    (dict(latent_height=61), "'latent_height': must be a multiple of the patch height"),
    (dict(patch_size=(2, 2, 2)), "'patch_size': temporal patch must be 1"),
    (dict(dim=1000), "'num_heads': must divide dim"),
    (dict(dim=48, num_heads=12), "head_dim"),
])
def test_model_config_errors_name_field_and_rule(fields, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**fields)


def test_pinned_and_window_chunks_per_mode():
  assert MemoryConfig().pinned_chunks == 0
  assert MemoryConfig().recent_chunks == 3
  longlive = MemoryConfig(mode="sink_window", local_attn_frames=12, sink_frames=3)
  assert (longlive.pinned_chunks, longlive.recent_chunks, longlive.min_capacity_chunks) == (1, 3, 4)
  self_forcing = MemoryConfig(mode="window", local_attn_frames=21, capacity_chunks=7)
  assert (self_forcing.pinned_chunks, self_forcing.recent_chunks) == (0, 7)


@pytest.mark.parametrize("cls", [ModelConfig, MemoryConfig, SamplerConfig, VAEConfig, TextEncoderConfig, WorldConfig])
def test_every_from_dict_refuses_unknown_fields_by_name(cls):
  fields = dataclasses.asdict(cls())
  assert cls.from_dict(json.loads(json.dumps(fields))) == cls()  # JSON round trip (lists back to tuples)
  with pytest.raises(ValueError, match=rf"unknown {cls.__name__} field\(s\) \['colour'\]; known fields: \[.*'{next(iter(fields))}'"):
    cls.from_dict({**fields, "colour": 1})


def test_memory_fields_of_a_model_config_are_checked_too():
  with pytest.raises(ValueError, match=r"unknown MemoryConfig field\(s\) \['topk'\]"):
    ModelConfig.from_dict({"memory": {"topk": 3}})


@pytest.mark.parametrize(("cls", "presets", "override"), [
    (ModelConfig, PRESETS, {"num_layers": 3}), (VAEConfig, vae.PRESETS, {"dtype": "bfloat16"}),
    (TextEncoderConfig, text.PRESETS, {"num_layers": 3})])
def test_presets_follow_one_convention(cls, presets, override):
  for name, factory in presets.items():
    assert cls.from_preset(name) == factory() and isinstance(factory(), cls)
    assert cls.from_preset(name, **override) == dataclasses.replace(factory(), **override)
  with pytest.raises(ValueError, match=f"unknown preset 'huge' for {cls.__name__}; choose one of"):
    cls.from_preset("huge")

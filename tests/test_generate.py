"""experiments/generate.py and omnimem_jax/generation/: the no-flag smoke run, a full run from a model
directory (DiT, VAE, umT5 and tokenizer checkpoints) with prompt switches and slot reuse, and bad input
(one-line error, exit code 2, nothing written, before any weights load)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from omnimem_jax.generation import plan as planning
from omnimem_jax.generation import run
from omnimem_jax.generation.options import GenerateError, GenerateOptions
from tests.configs import require_devices, tiny
from tests.tiny_models import save_dit, save_model_dir

ROOT = Path(__file__).parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "kernels")])  # the scripts import omnimem_jax and omnimem_kernels


def _frame_count(path: Path) -> int | None:
  """Frames in an mp4 as ffmpeg decodes them (None without imageio-ffmpeg)."""
  try:
    import imageio_ffmpeg  # noqa: PLC0415
  except ImportError:
    return None
  return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
  """A --model_dir of tiny converted checkpoints: dit/ (omnimem), vae/, text_encoder/, tokenizer/."""
  return save_model_dir(tmp_path_factory.mktemp("models"))


def test_lengths_round_up_to_whole_chunks():
  config = tiny()
  assert [planning.video_frames_of_chunks(n, config) for n in (1, 2, 14)] == [9, 21, 165]
  assert [planning.chunks_for_frames(f, config) for f in (1, 9, 10, 21, 22, 160)] == [1, 1, 2, 2, 3, 14]
  assert planning.chunks_for_frames(4089, config) == config.max_chunks == 341  # 255.6 s, the longest video


def test_latent_visualisation_follows_the_vae_frame_count():
  latents = np.random.default_rng(0).standard_normal((2, 4, 3, 2, 3)).astype(np.float32)
  first = run.visualise_latents(latents, first=True)
  later = run.visualise_latents(latents, first=False)
  assert first.shape == (2, 9, 16, 24, 3) and later.shape == (2, 12, 16, 24, 3) and first.dtype == np.uint8
  expected = np.round((np.clip(latents[1, :3, 2, 1, 2] / 3, -1, 1) + 1) * 127.5)
  np.testing.assert_array_equal(first[1, -1, 15, 23], expected)
  assert run.tile_batch(first).shape == (9, 16, 48, 3)
  assert run.visualise_latents(latents[:, :1], first=True)[0, 0, 0, 0].tolist() == [
      first[0, 0, 0, 0, 0]] * 3  # one channel: grey


def test_no_flag_smoke_run(tmp_path, monkeypatch, capsys):
  """`GenerateOptions()`: defaults only; a labelled smoke run, a playable mp4 and the report."""
  monkeypatch.chdir(tmp_path)
  report = run.generate(GenerateOptions())
  out, err = capsys.readouterr()
  assert out.startswith("SMOKE RUN") and "SMOKE RUN" in out.splitlines()[-1] and "random text embedding" in out
  progress = [line for line in err.splitlines() if line.startswith("chunk ")]
  assert len(progress) == 14 and progress[-1].startswith("chunk 14/14") and "FPS end to end" in progress[-1]
  assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["smoke.json", "smoke.mp4"]
  assert json.loads((tmp_path / "outputs/smoke.json").read_text()) == json.loads(json.dumps(report))
  assert report["smoke"] and report["inputs"]["conditioning"] == "random_embedding"
  assert report["video"] == {"chunks": 14, "latent_frames": 42, "frames": 165, "requested_frames": 160,
                             "seconds": 165 / 16, "fps": 16, "height": 64, "width": 128,
                             "pixels": "latent_visualisation"}
  timing = report["timing"]
  assert len(timing["chunk_seconds"]) == len(timing["dit_chunk_seconds"]) == 14 and timing["compilations"] == 1
  assert timing["dit_fps"] == pytest.approx(165 / sum(timing["dit_chunk_seconds"]))
  assert timing["end_to_end_fps"] == pytest.approx(165 / timing["end_to_end_seconds"])
  assert timing["end_to_end_fps"] < timing["dit_fps"]
  assert report["memory"]["capacity_chunks"] == 14 and report["memory"]["chunks_dropped"] == 0
  plan = report["memory"]["plan"]  # per part, next to the measured peak (tests/test_memory_plan.py checks the bytes)
  assert [(part["name"], part["chunks"]) for part in plan["parts"]] == [
      ("weights", None), ("KV store: full resolution", 14), ("KV store: pooled", 14), ("KV store: slot tables", None),
      ("rollout state", None),
      ("cross K/V (1 prompt)", None), ("working set: DiT step", None)]
  assert plan["fits"] and plan["total_bytes"] == sum(part["bytes"] for part in plan["parts"])
  assert "memory plan on " in out and "KV store: full resolution" in out
  peak_bytes, platform = report["memory"]["peak_device_bytes"], jax.devices()[0].platform
  if platform == "cpu":
    assert peak_bytes is None  # CPU keeps no statistics
  else:
    assert isinstance(peak_bytes, int) and peak_bytes > 0
  retrieval = report["retrieval"]
  assert len(retrieval["per_layer"]) == 2 and retrieval["selected"] > 0
  for layer in retrieval["per_layer"]:
    counts = np.array(layer["histogram"])
    assert len(counts) == 15 and counts.sum() == layer["selected"] > 0
    assert counts[-1] == 0  # 14 chunks in 14 slots: picks lie at most 13 back, each distance its own bin
  assert {"jax", "flax", "python"} <= set(report["versions"]) and report["device"]["platform"] == platform
  assert _frame_count(tmp_path / "outputs/smoke.mp4") in (None, 165)


def test_model_dir_prompt_switch_slot_reuse_and_latents(tmp_path, model_dir, capsys):
  """A prompt schedule with a KV recache, through a compact (fp8) store whose full-resolution ring drops chunks
  while its pooled tier keeps the video, with saved latents."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("# schedule\n0: a red dog runs\n\n4: a cat\n")
  # Under a chunk of recache spares the context pass a compilation (tests/test_rollout.py covers the recache).
  options = GenerateOptions(model_dir=str(model_dir), prompt_file=str(prompts), num_frames=50, capacity_chunks=3,
                            kv_dtype="fp8", recache_frames=2, output=str(tmp_path / "out/video.mp4"),
                            save_latents=str(tmp_path / "latents.npy"), report=str(tmp_path / "run.json"))
  report = run.generate(options)
  out = capsys.readouterr().out
  assert "SMOKE" not in out and "latent frame 3 (chunk 1)" in out and "dropping 2 chunks" in out
  assert not report["smoke"] and report["video"]["pixels"] == "vae" and report["video"]["frames"] == 57
  assert report["timing"]["compilations"] == 1  # a restored model's mesh does not recompile chunk 1
  assert [(p["latent_frame"], p["chunk"]) for p in report["inputs"]["prompts"]] == [(0, 0), (4, 1)]
  assert report["inputs"]["recache_chunks"] == 0  # 2 latent frames: less than a chunk
  assert report["memory"] == {**report["memory"], "kv_format": "fp8", "capacity_chunks": 3, "pooled_chunks": 5,
                              "chunks_in_memory": 3, "chunks_dropped": 2}  # the pooled tier keeps all 5 chunks
  tiers = {part["name"]: (part["dtype"], part["chunks"]) for part in report["memory"]["plan"]["parts"]}
  assert tiers["KV store: full resolution"] == ("fp8 as uint8", 3) and tiers["KV store: scales"] == ("float32", 3)
  assert tiers["KV store: recent ring"] == ("float32", 3) and tiers["KV store: pooled"] == ("float32", 5)
  assert report["video"]["requested_frames"] == 50 and any("rounded up to 5 whole chunks" in n for n in report["notes"])
  latents = np.load(tmp_path / "latents.npy")
  assert latents.shape == (1, 4, 15, 8, 16) and np.isfinite(latents).all()
  assert json.loads((tmp_path / "run.json").read_text())["memory"]["chunks_dropped"] == 2
  assert _frame_count(tmp_path / "out/video.mp4") in (None, 57)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.npy", "out", "prompts.txt", "run.json"]


def test_robust_a_failed_run_leaves_an_existing_output_untouched(tmp_path, monkeypatch):
  output = tmp_path / "video.mp4"
  output.write_bytes(b"previous video")

  def fail(plan):
    raise RuntimeError("interrupted")

  monkeypatch.setattr(run, "prompt_embeddings", fail)  # fails after the mp4 writer is made, before any frame
  with pytest.raises(RuntimeError, match="interrupted"):
    run.generate(GenerateOptions(output=str(output), num_frames=9))
  assert output.read_bytes() == b"previous video" and [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def _bad_input_cases(tmp: Path, model_dir: Path) -> list[tuple[dict, str]]:
  (tmp / "a_file").write_text("")
  np.save(tmp / "wide.npy", np.zeros((8, 16), np.float32))
  np.save(tmp / "long.npy", np.zeros((9, 32), np.float32))
  np.save(tmp / "ints.npy", np.zeros((2, 8, 32), np.int32))
  (tmp / "late.txt").write_text("3: a dog\n")
  (tmp / "past_end.txt").write_text("0: a dog\n300: a cat\n")
  (tmp / "garbled.txt").write_text("0: a dog\nthen a cat\n")
  (tmp / "same_chunk.txt").write_text("0: a dog\n2: a cat\n")
  dit, vae, encoder, tokenizer = (str(model_dir / name) for name in ("dit", "vae", "text_encoder", "tokenizer"))
  text = {"text_encoder": encoder, "tokenizer": tokenizer}
  visible = jax.device_count()  # CI: 4 fake CPU devices
  return [
      ({"checkpoint": str(tmp / "missing")}, "--checkpoint=.*missing does not exist"),
      ({"checkpoint": str(tmp)}, "not an OmniMem-JAX checkpoint"),
      ({"checkpoint": vae}, "holds a 'wan_vae' checkpoint, expected 'wan_dit'"),
      ({"vae": dit}, "holds a 'wan_dit' checkpoint, expected 'wan_vae'"),
      ({"checkpoint": dit, "preset": "wan2.1-t2v-1.3b"}, "is not a wan2.1-t2v-1.3b checkpoint .*dim 64 != 1536"),
      ({"preset": "huge"}, "--preset=huge is unknown"),
      ({"model_dir": str(tmp)}, "has no dit/"),
      ({"text_embeddings": str(tmp / "wide.npy")}, r"shape \[8, 16\]; expected \[tokens, 32\]"),
      ({"text_embeddings": str(tmp / "long.npy")}, r"1 <= tokens <= 8"),
      ({"text_embeddings": str(tmp / "ints.npy")}, "expected floating point"),
      ({"text_embeddings": str(tmp / "a_file")}, "not a readable .npy"),
      ({"seconds": 256.0}, "past the RoPE horizon of 1024 latent frames .255.8 s.*341 chunks"),
      ({"num_frames": 4090}, "past the RoPE horizon"),
      ({"seconds": 0.0}, "--seconds must be a finite number > 0"),
      ({"output": str(tmp / "a_file" / "video.mp4")}, "cannot be written: .*a_file is not a directory"),
      ({"output": str(tmp / "video.avi")}, "must end in .mp4"),
      ({"output": str(tmp)}, "must end in .mp4"),
      ({"report": str(tmp / "a_file" / "run.json")}, "--report=.* cannot be written"),
      ({"save_latents": str(tmp / "video.mp4"), "output": str(tmp / "video.mp4")}, "must end in .npy"),
      ({"report": str(tmp / "x.json"), "save_latents": str(tmp / "x.npy"), "output": str(tmp / "x.mp4")}, None),
      ({"prompt": "a dog", "text_embeddings": str(tmp / "wide.npy")}, "not --prompt and --text_embeddings"),
      ({"prompt": "a dog", "prompt_file": str(tmp / "late.txt")}, "not --prompt and --prompt_file"),
      ({"seconds": 2.0, "num_frames": 9}, "--seconds or --num_frames, not both"),
      ({"prompt": "a dog"}, "need a text encoder"),
      ({"prompt": "a dog", "text_encoder": encoder}, "need a text encoder"),
      ({"tokenizer": tokenizer}, "only used with --prompt"),
      ({"prompt": " ", **text}, "--prompt is empty"),
      ({"prompt": "a dog", "text_encoder": vae, "tokenizer": tokenizer}, "expected 'umt5_encoder'"),
      ({"prompt": "a dog", "text_encoder": encoder, "tokenizer": str(tmp)}, "neither tokenizer.json nor spiece"),
      ({"prompt_file": str(tmp / "late.txt"), **text}, "first prompt must start at latent frame 0"),
      ({"prompt_file": str(tmp / "past_end.txt"), **text}, "starts after the video ends"),
      ({"prompt_file": str(tmp / "garbled.txt"), **text}, "line 2: expected 'latent_frame: prompt'"),
      ({"prompt_file": str(tmp / "same_chunk.txt"), **text}, "must come after the previous prompt's chunk 0"),
      ({"prompt_file": str(tmp / "missing.txt"), **text}, "does not exist"),
      ({"capacity_chunks": 2}, "capacity_chunks.*must be >= 3"),
      ({"top_k": 0}, "top_k.*positive"),
      ({"attention": "sparse"}, "--attention=sparse is unknown"),
      ({"recache_frames": -3}, "--recache_frames must be >= 0"),
      ({"mesh": "data=2,pipe=2"}, "--mesh=data=2,pipe=2: mesh must look like 'data=2,model=2'"),
      ({"mesh": f"data={visible},model=4", "batch_size": visible},
       f"needs {4 * visible} devices, only {visible} visible"),  # dividing the heads and the batch
      ({"mesh": "model=3"}, r"model axis \(3\) must divide the 4 heads"),
      ({"mesh": "data=2"}, r"data axis \(2\) must divide the batch \(1 prompts\)"),
      ({"batch_size": 0}, "--batch_size must be >= 1"),
      ({"backends": "selection=cuda"}, r"--backends=selection=cuda: unknown selection backend\(s\) \['cuda'\]"),
      ({"backends": "speed=fast"}, "--backends=speed=fast: backends must be op=name"),
      ({"kv_dtype": "fp16"}, r"--kv_dtype=fp16 is unknown; choose one of \['bf16', 'fp8', 'int4'\]"),
      ({"kv_dtype": "fp8", "attention": "window"}, "--kv_dtype=fp8 compacts .* window mode reads its whole history "
                                                   "densely: use --kv_dtype=bf16"),
  ]


def test_robust_bad_input_is_refused_before_any_work(tmp_path, model_dir):
  cases = _bad_input_cases(tmp_path, model_dir)
  before = sorted(tmp_path.rglob("*"))
  for overrides, message in cases:
    options = GenerateOptions(**{"output": str(tmp_path / "out.mp4"), **overrides})
    if message is None:
      planning.plan(options)
      continue
    try:
      planning.plan(options)
    except GenerateError as err:
      assert re.search(message, str(err)), (overrides, str(err))
    else:
      pytest.fail(f"{overrides} was accepted")
  assert sorted(tmp_path.rglob("*")) == before  # validation writes nothing


def test_robust_omnimem_on_a_checkpoint_without_gates(tmp_path):
  path = save_dit(tmp_path / "window", tiny(mode="window"))
  with pytest.raises(GenerateError, match="has no OmniMem gates .*--attention=window, or --init_missing_gates"):
    planning.plan(GenerateOptions(checkpoint=str(path), attention="omnimem"))
  assert planning.plan(GenerateOptions(checkpoint=str(path))).config.memory.mode == "window"
  assert planning.plan(GenerateOptions(checkpoint=str(path), attention="omnimem", init_missing_gates=True))


def test_cli_without_flags_runs_the_demo_checkpoint(tmp_path):
  """What `make demo` runs: the committed demo model, a playable mp4 and the report."""
  env = {**os.environ, "PYTHONPATH": PYTHONPATH, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(ROOT / "experiments/generate.py")], check=False, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "outputs/demo.json").read_text())
  assert report["inputs"]["checkpoint"] == "assets/demo_checkpoint" and not report["smoke"]
  assert report["video"]["frames"] == 165 and (tmp_path / "outputs/demo.mp4").stat().st_size > 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint=/nonexistent/ckpt"], "error: --checkpoint=/nonexistent/ckpt does not exist"),
    (["--prompt=a dog", "--text_embeddings=x.npy"], "error: give one of --prompt"),
    (["--attention=sparse"], "error: flag --attention=sparse"),
    (["--backends=dense=cuda"], "error: --backends=dense=cuda: unknown dense backend"),
])
def test_robust_cli_bad_input_exits_2_with_one_line(tmp_path, flags, message):
  command = [sys.executable, str(ROOT / "experiments/generate.py"), *flags, f"--output={tmp_path / 'out.mp4'}"]
  env = {**os.environ, "PYTHONPATH": PYTHONPATH, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
  assert list(tmp_path.iterdir()) == []


def test_cli_backends_reach_the_report(tmp_path):
  """--backends on the tiny preset (CPU): the report records what was asked, the preference lists, and
  what the rollout's compiled functions ran (tests/test_backends.py shows each choice reaching its op)."""
  command = [sys.executable, str(ROOT / "experiments/generate.py"), "--preset=tiny", "--num_frames=9",
             "--backends=selection=xla,topk=xla,dense=xla", f"--output={tmp_path / 'out.mp4'}"]
  env = {**os.environ, "PYTHONPATH": PYTHONPATH, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  backends = json.loads((tmp_path / "out.json").read_text())["backends"]
  assert backends["requested"] == {"selection": "xla", "topk": "xla", "dense": "xla"}
  assert backends["preferences"] == {"selection": ["xla"], "topk": ["xla"], "dense": ["xla"]}
  assert backends["used"] == {"block_topk": ["xla"], "masked_attention": ["xla"], "segment_attention": ["xla"],
                              "selection_attention": ["xla"]}


def test_sharded_batch_run(tmp_path):
  """--mesh data=2,model=2 --batch_size=2 on 4 fake devices: two videos side by side, heads over 2 devices."""
  require_devices(4)
  options = GenerateOptions(output=str(tmp_path / "video.mp4"), num_frames=9, mesh="data=2,model=2", batch_size=2,
                            save_latents=str(tmp_path / "latents.npy"))
  report = run.generate(options)
  assert report["config"]["mesh"] == {"data": 2, "model": 2} and report["config"]["batch_size"] == 2
  latents = np.load(tmp_path / "latents.npy")
  assert latents.shape[0] == 2 and np.isfinite(latents).all() and not np.allclose(latents[0], latents[1])


def test_report_paths_default_next_to_the_output(tmp_path):
  plan = planning.plan(GenerateOptions(output=str(tmp_path / "clips/a.mp4"), seconds=1.0))
  assert plan.report == tmp_path / "clips/a.json" and plan.num_chunks == 2 and plan.smoke
  assert plan.config.memory.capacity_chunks == 3  # full history, at least the sliding window

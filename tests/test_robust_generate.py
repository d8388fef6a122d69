"""Issue 18, generation side: no bad input crashes, hangs or lies. Each bad input gives a GenerateError
(in process) or exit code 2 with one line `error: ...` (the CLI), and no existing output changes;
NaN latents stop the run naming the chunk; SIGTERM leaves no partial file; a --mesh run prints no
fork warning; warnings become notes in the report; speeds lead with end-to-end FPS; the retrieval
summary is a distance distribution. docs/bad_inputs.md lists every case with its test."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from omnimem_jax import sampler
from omnimem_jax.generation import plan as planning
from omnimem_jax.generation import report, run
from omnimem_jax.generation.options import MAX_SEED, GenerateError, GenerateOptions
from omnimem_jax.memory import select, store
from omnimem_jax.rollout import NonFiniteLatentsError, Rollout, first_nonfinite_chunk
from tests.configs import tiny
from tests.tiny_models import DIT_WEIGHTS, save_dit, save_text_model

ROOT = Path(__file__).parents[1]
GENERATE = str(ROOT / "experiments/generate.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
  """Tiny converted checkpoints: a window-mode DiT (no gates), one with a NaN weight, a text encoder
  and a tokenizer."""
  root = tmp_path_factory.mktemp("models")
  weights = load_file(DIT_WEIGHTS)
  weights["head.head.weight"][0, 0] = np.nan
  save_file(weights, root / "nan.safetensors")
  text_encoder, tokenizer = save_text_model(root)
  return {"window_dit": save_dit(root / "window_dit", tiny(mode="window")),
          "nan_dit": save_dit(root / "nan_dit", tiny(mode="window"), weights=root / "nan.safetensors"),
          "text_encoder": text_encoder, "tokenizer": tokenizer}


@pytest.fixture
def existing(tmp_path) -> dict[Path, bytes]:
  """An mp4 and a report from an earlier run, which nothing may change."""
  files = {tmp_path / "out.mp4": b"previous video", tmp_path / "out.json": b'{"previous": "report"}'}
  for path, content in files.items():
    path.write_bytes(content)
  return files


def _files(directory: Path) -> dict[str, bytes]:
  """Every file under `directory`, hidden ones included, with its content."""
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in sorted(directory.rglob("*")) if path.is_file()}


def _refused(directory: Path, message: str, **flags) -> None:
  """planning.plan refuses `flags` (output: directory/out.mp4) with a one-line GenerateError matching
  `message`, and changes no file under `directory`."""
  before = _files(directory)
  with pytest.raises(GenerateError) as caught:
    planning.plan(GenerateOptions(**{"output": str(directory / "out.mp4"), **flags}))
  assert re.search(message, str(caught.value)) and "\n" not in str(caught.value), str(caught.value)
  assert _files(directory) == before


def _cli(flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, GENERATE, *flags], check=False, capture_output=True, text=True, cwd=cwd,
                        env=ENV, timeout=300)


# ---- bad input refused at plan time ---------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_robust_non_finite_text_embeddings_are_refused(tmp_path, existing, value):
  embeddings = np.zeros((2, 8, 32), np.float32)
  embeddings[1, 3, 5] = value
  np.save(tmp_path / "x.npy", embeddings)
  _refused(tmp_path, r"^--text_embeddings=.*x\.npy holds 1 NaN or infinite values \(the first at index \[1, 3, 5\]\); "
                     "a text encoder's output is finite", text_embeddings=str(tmp_path / "x.npy"))


def test_robust_top_k_beyond_the_candidate_blocks_is_refused(tmp_path, existing):
  # 10 s = 14 chunks, full history: chunk 13 selects from chunks 0..10 = 11 chunks of 24 blocks.
  _refused(tmp_path, r"^--top_k=100000 exceeds the 264 blocks a query group can select from in this run .*14 "
                     r"chunks, capacity_chunks 14, exclude_window_chunks 3\); the maximum is --top_k=264$",
           top_k=100000)
  assert planning.plan(GenerateOptions(top_k=264, output=str(tmp_path / "out.mp4"))).config.memory.top_k == 264
  _refused(tmp_path, "the maximum is --top_k=24$", top_k=25, num_frames=9)  # chunk 0 selects from itself
  _refused(tmp_path, "the maximum is --top_k=72$", top_k=73, capacity_chunks=5)  # 5 slots: 3 chunks at most
  assert planning.plan(GenerateOptions(top_k=100000, attention="window", output=str(tmp_path / "out.mp4")))


@pytest.mark.parametrize("memory", [{}, {"capacity_chunks": 5}, {"exclude_window_chunks": 0},
                                    {"progressive_exclude": False}, {"exclude_window_chunks": 5, "capacity_chunks": 4}])
def test_robust_max_candidate_blocks_matches_the_selection(memory):
  """The plan's bound equals the most candidates `select.candidate_blocks` gives over a 14-chunk run."""
  config = tiny(**{"capacity_chunks": 14, **memory})
  tables, most = store.init_tables(config.memory), 0
  for chunk in range(14):
    tables = store.assign(tables, chunk, config.memory)
    most = max(most, int(select.candidate_blocks(tables, chunk, config).sum()))
  assert planning.max_candidate_blocks(config, 14) == most > 0


def test_robust_seed_outside_32_bits_is_refused(tmp_path, existing):
  for seed in (-1, MAX_SEED + 1):
    _refused(tmp_path, rf"^--seed must be in 0\.\.4294967295 \(a 32-bit noise seed\), got {seed}$", seed=seed)
  assert planning.plan(GenerateOptions(seed=MAX_SEED, output=str(tmp_path / "out.mp4")))


@pytest.mark.parametrize("seconds", [np.inf, -np.inf, np.nan, 1e308, -2.0])
def test_robust_seconds_must_be_finite_and_positive(tmp_path, existing, seconds):
  _refused(tmp_path, rf"^--seconds must be a finite number > 0, got {re.escape(str(seconds))}$", seconds=seconds)


def test_robust_the_longest_video_the_error_names_is_accepted(tmp_path, existing):
  _refused(tmp_path, r"--seconds=255\.6 needs 342 chunks .* the longest video is 341 chunks = 4089 frames: "
                     r"--num_frames=4089 or --seconds=255\.56$", seconds=255.6)
  _refused(tmp_path, "--seconds=255.57 needs 342 chunks", seconds=255.57)
  _refused(tmp_path, "--num_frames=4090 needs 342 chunks", num_frames=4090)
  for flags in ({"seconds": 255.56}, {"num_frames": 4089}):
    assert planning.plan(GenerateOptions(output=str(tmp_path / "out.mp4"), **flags)).num_chunks == 341


def test_robust_prompt_file_not_utf8_is_refused(tmp_path, existing, models):
  (tmp_path / "prompts.txt").write_bytes(b"0: a caf\xe9 at night\n")  # Latin-1
  _refused(tmp_path, r"^--prompt_file=.*prompts\.txt is not UTF-8 text: byte 0xe9 at offset 8; save it as UTF-8$",
           prompt_file=str(tmp_path / "prompts.txt"), text_encoder=str(models["text_encoder"]),
           tokenizer=str(models["tokenizer"]))


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed=-1"], "error: --seed must be in 0..4294967295 (a 32-bit noise seed), got -1"),
    (["--seconds=inf"], "error: --seconds must be a finite number > 0, got inf"),
    (["--prompt_file=prompts.txt", "--text_encoder={text_encoder}", "--tokenizer={tokenizer}"],
     "error: --prompt_file=prompts.txt is not UTF-8 text: byte 0xe9 at offset 8"),
])
def test_robust_cli_bad_input_gives_one_line_and_exit_2(tmp_path, existing, models, flags, message):
  """Once tracebacks (after "generating" was printed, for --seed=-1)."""
  (tmp_path / "prompts.txt").write_bytes(b"0: a caf\xe9 at night\n")
  before = _files(tmp_path)
  result = _cli([*(flag.format(**models) for flag in flags), "--preset=tiny", "--output=out.mp4"], tmp_path)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message), result.stderr
  assert _files(tmp_path) == before


def test_robust_default_outputs_keep_the_demo_video(tmp_path, monkeypatch):
  """Only the demo (experiments/generate.py without model flags) writes outputs/demo.*: random
  weights write outputs/smoke.*, another model outputs/video.* (the CLI: the --mesh SIGTERM test)."""
  monkeypatch.chdir(tmp_path)
  assert planning.plan(GenerateOptions(preset="tiny")).output == Path("outputs/smoke.mp4")
  assert planning.plan(GenerateOptions()).report == Path("outputs/smoke.json")
  demo = planning.plan(GenerateOptions(checkpoint=str(ROOT / "assets/demo_checkpoint")))
  assert demo.output == Path("outputs/video.mp4") and demo.report == Path("outputs/video.json")


def test_robust_report_paths_as_given():
  """Relative and outside paths as given; the demo checkpoint that generate.py fills in (absolute)
  relative to the repository, never the machine's checkout location."""
  assert report.shown_path(ROOT / "assets/demo_checkpoint") == "assets/demo_checkpoint"
  assert report.shown_path("models/dit") == "models/dit" and report.shown_path("/data/x.npy") == "/data/x.npy"
  assert report.shown_path("../x/y.mp4") == "../x/y.mp4" and report.shown_path(None) is None


# ---- runs ------------------------------------------------------------------------------------------


def _nan_from_chunk_1(key, chunk, step, shape):
  """The default noise, NaN for chunk 1 (the model turns it into NaN latents)."""
  return jnp.where(chunk == 1, jnp.nan, sampler.gaussian_noise(key, chunk, step, shape))


def test_robust_first_nonfinite_chunk_names_the_first_bad_chunk():
  """The device-side reduction behind `Rollout.check_finite`: per segment, the first chunk with NaN or
  inf latents; an earlier one stays."""
  latents = np.zeros((3, 1, 4, 3, 2, 2), np.float32)  # [chunks, B, C, frames, H, W]
  chunks = jnp.arange(5, 8)
  assert int(first_nonfinite_chunk(jnp.int32(-1), latents, chunks)) == -1
  latents[1, 0, 2, 1, 0, 1], latents[2, 0, 0, 0, 0, 0] = np.inf, np.nan
  assert int(first_nonfinite_chunk(jnp.int32(-1), latents, chunks)) == 6
  assert int(first_nonfinite_chunk(jnp.int32(2), latents, chunks)) == 2


def test_robust_nan_latents_remove_the_partial_video(tmp_path, existing, monkeypatch):
  """Chunk 0 is written to the partial mp4, chunk 1 is NaN: the rollout's stream stops, naming chunk 1,
  and the run leaves no partial file, no report, and the earlier outputs as they were."""
  monkeypatch.setattr(run, "Rollout", functools.partial(Rollout, noise=_nan_from_chunk_1))
  with pytest.raises(NonFiniteLatentsError, match="^chunk 1: "):
    run.generate(GenerateOptions(num_frames=21, output=str(tmp_path / "out.mp4"),
                                 save_latents=str(tmp_path / "latents.npy")))
  assert _files(tmp_path) == {path.name: content for path, content in existing.items()}


def test_robust_cli_nan_checkpoint_exits_2_with_one_line(tmp_path, existing, models):
  result = _cli([f"--checkpoint={models['nan_dit']}", "--num_frames=21", "--output=out.mp4"], tmp_path)
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      "error: chunk 0: the DiT made NaN or infinite latents (are the checkpoint's weights or the text embeddings "
      "finite? is the dtype too narrow?); out.mp4 was not written (an existing file is untouched)"]
  assert _files(tmp_path) == {path.name: content for path, content in existing.items()}


def test_robust_warnings_become_notes_and_paths_stay_as_given(tmp_path, models, monkeypatch, capsys):
  """Untrained gates (restore's log warning) and a truncated prompt (the tokenizer's Python warning)
  are printed on stdout as notes and land in the report; the report shows paths as given; speeds lead
  with end-to-end FPS."""
  monkeypatch.chdir(tmp_path)
  for name in ("window_dit", "text_encoder", "tokenizer"):
    (tmp_path / name).symlink_to(models[name])
  record = run.generate(GenerateOptions(
      checkpoint="window_dit", attention="omnimem", init_missing_gates=True, text_encoder="text_encoder",
      tokenizer="tokenizer", prompt="a red dog runs over the green hill at dawn", num_frames=9, output="clips/a.mp4"))
  out, err = capsys.readouterr()
  warned = ["OmniMem gates were freshly initialised", "prompt 0 is longer than text_len = 8 tokens"]
  for text in warned:
    assert text in out and text not in err and sum(text in note for note in record["notes"]) == 1
  assert [line for line in err.splitlines() if not line.startswith("chunk ")] == []
  assert re.fullmatch(r"chunk 1/1 +[0-9.]+ FPS end to end +[0-9.]+ ms  \(DiT [0-9.]+ ms\)  ETA 0\.0 s", err.strip())
  assert json.loads((tmp_path / "clips/a.json").read_text())["notes"] == record["notes"]
  assert {key: record["inputs"][key] for key in ("checkpoint", "text_encoder", "tokenizer")} == {
      "checkpoint": "window_dit", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
  assert record["output"] == "clips/a.mp4"
  timing = record["timing"]
  assert list(timing)[:2] == ["end_to_end_fps", "end_to_end_seconds"]
  assert timing["end_to_end_fps"] == pytest.approx(9 / timing["end_to_end_seconds"])
  assert timing["end_to_end_fps"] <= 9 / sum(timing["chunk_seconds"]) <= timing["dit_fps"]
  assert sum(timing["chunk_seconds"]) >= sum(timing["dit_chunk_seconds"]) and timing["fps_after_first_chunk"] is None
  closing = out.splitlines()[-1]
  assert re.search(r"wrote clips/a\.mp4 .* [0-9.]+ FPS end to end \(.*\); the DiT alone [0-9.]+ FPS", closing)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_robust_cli_mesh_smoke_run_stopped_by_a_signal(tmp_path, stop):
  """A --mesh smoke run on 4 fake CPU devices, without --output, beside the demo's outputs, sent SIGTERM
  or SIGINT (Ctrl-C) mid-video: ffmpeg was writing outputs/.smoke.partial-PID.mp4 (a smoke run never
  writes outputs/demo.*); stderr holds progress lines only (no os.fork() warning: ffmpeg is spawned
  without fork hooks; no traceback); the exit code is 128 + the signal's number; no partial file is left
  and the demo's outputs are untouched."""
  outputs = tmp_path / "outputs"
  outputs.mkdir()
  demo = {"demo.mp4": b"the demo's video", "demo.json": b'{"the demo": "report"}'}
  for name, content in demo.items():
    (outputs / name).write_bytes(content)
  devices = f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"  # with the tests' own flags
  process = subprocess.Popen([sys.executable, GENERATE, "--preset=tiny", "--seconds=60", "--mesh=model=2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**ENV, "XLA_FLAGS": devices})
  try:
    stderr = []
    for line in process.stderr:  # up to the first progress line: chunk 0 is in the partial mp4
      stderr.append(line)
      if line.startswith("chunk "):
        break
    partial = sorted(path.name for path in outputs.iterdir() if ".partial" in path.name)
    process.send_signal(stop)
    stderr.append(process.stderr.read())
    process.wait(timeout=120)
  finally:
    process.kill()
  assert partial == [f".smoke.partial-{process.pid}.mp4"], "".join(stderr)
  assert process.returncode == 128 + stop
  assert [line for line in "".join(stderr).splitlines() if not line.startswith("chunk ")] == []
  assert _files(outputs) == demo


# ---- the report's retrieval summary --------------------------------------------------------------


def test_robust_retrieval_summary_of_a_hand_made_histogram():
  histograms = np.zeros((3, 2, 5), np.int32)  # [chunks, layers, bins]: picks 0..4 chunks back
  histograms[0, 0, 0] = 4
  histograms[2, 0, [0, 2]] = [2, 2]
  histograms[2, 1, [1, 4]] = [1, 3]
  summary = report.retrieval_summary(histograms)
  assert summary["selected"] == 12 and summary["histogram"] == [6, 1, 2, 0, 3]
  assert summary["mean_distance"] == pytest.approx((1 + 4 + 12) / 12) and summary["median_distance"] == 0
  layer_0, layer_1 = summary["per_layer"]
  assert layer_0 == {"layer": 0, "selected": 8, "histogram": [6, 0, 2, 0, 0], "mean_distance": 0.5,
                     "median_distance": 0}
  assert layer_1 == {"layer": 1, "selected": 4, "histogram": [0, 1, 0, 0, 3], "mean_distance": 3.25,
                     "median_distance": 4}
  empty = report.retrieval_summary(np.zeros((1, 1, 3), np.int32))
  assert empty["selected"] == 0 and empty["mean_distance"] is None and empty["median_distance"] is None
  assert json.loads(json.dumps(summary)) == summary

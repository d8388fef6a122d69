"""Bad input to experiments/train.py, convert_checkpoint.py and eval_memory.py (issue 18): one line
`error: ...`, exit code 2, nothing existing changed; and the library errors behind them (damaged
checkpoints, garbage files, LoRA files without LoRA). The scripts' `main` runs in this process; only
`test_convert_command_line_output` starts the real command line, where its output is the point.
Rows of docs/bad_inputs.md name these tests."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from omnimem_jax import checkpoints, cli, io
from omnimem_jax.convert import state_dict as sd
from omnimem_jax.convert import umt5, wan_dit, wan_vae
from omnimem_jax.generation import plan as planning
from omnimem_jax.generation.options import GenerateError, GenerateOptions
from omnimem_jax.model.text import TextEncoderConfig
from omnimem_jax.model.vae import VAEConfig
from tests.configs import tiny

# Orbax abandons its other reads of a damaged checkpoint; closing them raises (Orbax's bug), which the
# garbage collector reports whenever it gets to them, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "assets" / "demo_checkpoint"  # a trained omnimem export
FIXTURES = ROOT / "tests" / "fixtures"
ORIGINAL = FIXTURES / "wan_dit_original.safetensors"
# A 1-layer, dim-32 dense model on 2-chunk clips: every training run here shares one compilation.
TRAIN_FLAGS = ("--mode=dense", "--dim=32", "--num_layers=1", "--num_chunks=2", "--batch_size=2", "--world_width=32",
               "--warmup_steps=1", "--log_every=1")


# ---- running the scripts in this process ---------------------------------------------------------


@contextlib.contextmanager
def script(name: str) -> Iterator[types.ModuleType]:
  """experiments/<name>.py imported as a fresh module; its flags are removed again on exit (the scripts
  define flags of the same names, which absl allows only once per process)."""
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    flags.FLAGS.unparse_flags()
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)


def call(module: types.ModuleType, *args: str) -> int:
  """`python experiments/<module> args`, in this process: the exit code (0 when main returns)."""
  flags.FLAGS.unparse_flags()
  hook = sys.unraisablehook  # cli.fail silences it for the process's last moments
  try:
    module.main(cli.parse_flags([module.__file__, *args]))
  except SystemExit as exit_:
    return exit_.code
  finally:
    sys.unraisablehook = hook
  return 0


def run_script(name: str, *args: str) -> int:
  with script(name) as module:
    return call(module, *args)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
  """The one line a refused command printed on stderr (asserted to be exactly one `error: ...` line)."""
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
  """Every file under `path` (or `path` itself) with its bytes: equal snapshots = nothing changed."""
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  return {str(file.relative_to(path.parent)): file.read_bytes() for file in files}


def refused(capsys, name: str, *args: str, unchanged: Path | None = None) -> str:
  """Runs a command that must be refused: exit code 2, one error line (returned), `unchanged` intact."""
  before = snapshot(unchanged) if unchanged is not None else None
  assert run_script(name, *args) == 2
  if unchanged is not None:
    assert snapshot(unchanged) == before
  return error_line(capsys)


# ---- experiments/train.py ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
  """A run of 2 steps with --save_every=1: the step count is a multiple of --save_every."""
  run_dir = tmp_path_factory.mktemp("train") / "run"
  assert run_script("train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2", "--save_every=1") == 0
  return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
  return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def test_train_finishes_when_steps_are_a_multiple_of_save_every(finished_run):
  log = json.loads((finished_run / "log.json").read_text())
  assert log["steps"] == 2 and [entry["step"] for entry in log["history"]] == [1, 2]
  assert sorted(p.name for p in (finished_run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_train_rerun_of_a_finished_run_changes_nothing_then_exports(finished_run, tmp_path, capsys):
  run_dir = copy_of(finished_run, tmp_path)
  before = snapshot(run_dir)
  assert run_script("train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2", "--save_every=1") == 0
  assert snapshot(run_dir) == before  # idempotent: no training, the log and checkpoints as they were
  export = tmp_path / "export"
  assert run_script("train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2", f"--export={export}") == 0
  assert snapshot(run_dir) == before and "0 in this run" in capsys.readouterr().out
  record = checkpoints.read_record(export, checkpoints.Kind.DIT)
  assert record.training["steps"] == 2
  assert record.training["train_seconds"] == json.loads((run_dir / "log.json").read_text())["train_seconds"]
  assert "already exists" in refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2",
                                     f"--export={export}", unchanged=tmp_path)


def test_train_export_that_fails_at_the_end_can_be_retried(finished_run, tmp_path, capsys, monkeypatch):
  from omnimem_jax import training

  run_dir, export = copy_of(finished_run, tmp_path), tmp_path / "export"

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  with monkeypatch.context() as patch:
    patch.setattr(training.Trainer, "export", disk_full)
    line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2", f"--export={export}",
                   unchanged=run_dir)
  assert line == (f"error: --export={export}: [Errno 28] No space left on device; the run is saved: run the same "
                  "command again to export it")
  assert run_script("train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=2", f"--export={export}") == 0
  assert checkpoints.read_record(export, checkpoints.Kind.DIT).training["steps"] == 2


def test_train_refuses_to_resume_with_another_architecture(finished_run, tmp_path, capsys):
  run_dir = copy_of(finished_run, tmp_path)
  line = refused(capsys, "train", *TRAIN_FLAGS, "--dim=64", f"--run_dir={run_dir}", "--steps=3", unchanged=run_dir)
  assert line.startswith(f"error: dim=64 but the run in {run_dir / 'checkpoints'} was trained with dim=32 (also "
                         "ffn_dim=128 trained with 64, num_heads=2 trained with 1)")
  line = refused(capsys, "train", *TRAIN_FLAGS, "--mode=window", f"--run_dir={run_dir}", unchanged=run_dir)
  assert "mode=window but the run in" in line and "trained with mode=dense" in line


def test_train_resume_of_a_run_without_its_config_file_is_checked_by_orbax(finished_run, tmp_path, capsys):
  run_dir = copy_of(finished_run, tmp_path)
  (run_dir / "checkpoints" / "train_config.json").unlink()  # as runs saved before the file existed
  line = refused(capsys, "train", *TRAIN_FLAGS, "--dim=64", f"--run_dir={run_dir}", "--steps=3", unchanged=run_dir)
  assert f"error: cannot restore {run_dir / 'checkpoints' / '2'} (truncated, corrupted, or arrays of other " in line
  assert "is not compatible with the stored shape" in line


def test_train_refuses_a_damaged_checkpoint(finished_run, tmp_path, capsys):
  run_dir = copy_of(finished_run, tmp_path)
  for data in (run_dir / "checkpoints" / "2").rglob("ocdbt.process_0/d/*"):
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=3", unchanged=run_dir)
  assert line.startswith(f"error: cannot restore {run_dir / 'checkpoints' / '2'} (truncated, corrupted")


def test_train_refuses_a_log_that_is_not_a_loss_log(finished_run, tmp_path, capsys):
  run_dir = copy_of(finished_run, tmp_path)
  (run_dir / "log.json").write_text("{not json")
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=3", unchanged=run_dir)
  assert line.startswith(f"error: {run_dir / 'log.json'} is not a readable JSON loss log")
  (run_dir / "log.json").write_text("[1, 2]")
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={run_dir}", "--steps=3", unchanged=run_dir)
  assert "is not a loss log of experiments/train.py (no 'history' list)" in line


def test_train_refuses_unwritable_paths_before_training(tmp_path, capsys, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={blocker / 'run'}", unchanged=tmp_path)
  assert line == f"error: --run_dir: cannot write {blocker / 'run'}: {blocker} is a file, not a directory"
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={tmp_path / 'run'}", f"--export={blocker / 'export'}",
                 unchanged=tmp_path)
  assert line == f"error: --export: cannot write {blocker / 'export'}: {blocker} is a file, not a directory"
  assert not (tmp_path / "run").exists()
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only directory (tests may run as root)
  line = refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={tmp_path / 'run'}", unchanged=tmp_path)
  assert line == f"error: --run_dir: cannot write {tmp_path / 'run'}: no write permission in {tmp_path}"


@pytest.mark.parametrize(("args", "message"), [
    ((), "--run_dir is required"),
    (("--steps=0",), "--steps must be >= 1, got 0"),
    (("--dim=48",), "--dim must be a multiple of 32 (heads of 32), got 48"),
    (("--time_budget_s=0",), "--time_budget_s must be > 0, got 0.0"),
    (("--num_chunks=200",), "num_chunks=200 leaves the RoPE table of 1024 frames"),
    (("--world_width=30",), "invalid WorldConfig field 'speed': must divide world_width=30"),
    (("--mode=sparse",), "flag --mode=sparse"),
    (("extra",), "unexpected arguments ['extra']"),
])
def test_train_refuses_bad_flags_before_any_work(tmp_path, capsys, args, message):
  run_dir = [] if args == () else [f"--run_dir={tmp_path / 'run'}"]
  line = refused(capsys, "train", *TRAIN_FLAGS, *run_dir, *args, unchanged=tmp_path)
  assert message in line
  assert not (tmp_path / "run").exists()


def test_train_refuses_a_run_dir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "run").write_text("x")
  assert "is not a directory" in refused(capsys, "train", *TRAIN_FLAGS, f"--run_dir={tmp_path / 'run'}",
                                         unchanged=tmp_path)


# ---- damaged checkpoints (omnimem_jax.checkpoints) -----------------------------------------------


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory) -> Path:
  return wan_dit.convert_checkpoint(ORIGINAL, tmp_path_factory.mktemp("dit") / "dense", tiny(mode="dense"),
                                    dtype=jnp.float32)


def truncate_arrays(directory: Path) -> None:
  for data in (directory / "params" / "ocdbt.process_0" / "d").iterdir():
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])


def edit_config(directory: Path, **fields) -> None:
  record = json.loads((directory / checkpoints.METADATA_FILE).read_text())
  record["config"].update(fields)
  (directory / checkpoints.METADATA_FILE).write_text(json.dumps(record))


DAMAGES = {  # name: (damage, message, found before any weights load)
    "params_missing": (lambda d: shutil.rmtree(d / "params"), "params does not exist: the checkpoint has lost", True),
    "metadata_missing": (lambda d: (d / "params" / "_METADATA").unlink(),
                         r"params is unreadable \(truncated or corrupted\): Metadata file \(named _METADATA\)", True),
    "metadata_garbled": (lambda d: (d / "params" / "_METADATA").write_text("{"),
                         r"params is unreadable \(truncated or corrupted\): Expecting", True),
    "arrays_truncated": (truncate_arrays, r"cannot restore .*params \(truncated, corrupted, or arrays of other "
                                          r"shapes\): OUT_OF_RANGE: Error reading", False),
    "config_disagrees": (lambda d: edit_config(d, ffn_dim=64), r"params does not match the config in .*omnimem.json: "
                         r"blocks.ffn.linear_in.bias: stored \(2, 128\), the config gives \(2, 64\);", True),
    "config_unreadable": (lambda d: edit_config(d, dim="wide"), r"omnimem.json holds an unreadable ModelConfig", True),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_one_clear_error(dit_checkpoint, tmp_path, damage):
  damaged = Path(shutil.copytree(dit_checkpoint, tmp_path / "damaged"))
  apply, message, found_early = DAMAGES[damage]
  apply(damaged)
  if found_early:
    with pytest.raises(checkpoints.CheckpointError, match=message) as error:
      wan_dit.check_checkpoint(damaged)
    assert str(damaged) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(GenerateError, match="--checkpoint: .*" + message):  # generate's plan, before any work
      planning.plan(GenerateOptions(checkpoint=str(damaged), output=str(tmp_path / "out.mp4")))
  else:
    wan_dit.check_checkpoint(damaged)  # the metadata is intact
  with pytest.raises(checkpoints.CheckpointError, match=message) as error:
    wan_dit.restore_model(damaged, dtype=jnp.float32)
  assert str(damaged) in str(error.value) and "\n" not in str(error.value)


def test_damaged_vae_and_text_encoder_checkpoints(tmp_path):
  vae = wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_diffusers.safetensors", tmp_path / "vae",
                                   VAEConfig.from_preset("tiny", param_dtype="float32"))
  shutil.rmtree(vae / "params")
  with pytest.raises(checkpoints.CheckpointError, match="params does not exist"):
    wan_vae.restore_vae(vae)
  text = umt5.convert_checkpoint(FIXTURES / "umt5_tiny_hf.safetensors", tmp_path / "text",
                                 TextEncoderConfig.from_preset("tiny", param_dtype="float32"))
  edit_config(text, num_layers=3)
  with pytest.raises(checkpoints.CheckpointError, match="does not match the config.*layers"):
    umt5.restore_text_encoder(text)


# ---- experiments/convert_checkpoint.py and the files it reads -------------------------------------


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
  encoded = json.dumps(header).encode()
  return struct.pack("<Q", len(encoded)) + encoded + data


GARBAGE_FILES = {  # name: (bytes, message)
    "empty": (b"", "is not a .safetensors file: its 0 bytes cannot hold the header"),
    "short": (b"abc", "is not a .safetensors file: its 3 bytes cannot hold the header"),
    "huge_header_length": (struct.pack("<Q", 2**63) + b"{}", "cannot hold the header it announces"),
    "text": (b"this is a text file, not weights", "cannot hold the header it announces"),
    "header_not_json": (struct.pack("<Q", 4) + b"\xff{x}", "its header is not JSON"),
    "header_not_object": (safetensors_bytes([1, 2]), "its header is not a JSON object"),
    "entry_malformed": (safetensors_bytes({"w": {"dtype": "F32"}}), "tensor 'w' has a malformed entry"),
    "data_truncated": (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                       r"is truncated or damaged: tensor 'w' \(F32 \[4\]\) points at bytes \[0, 16\) of 8"),
    "size_mismatch": (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
                      "is truncated or damaged"),
    "unsupported_dtype": (safetensors_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
                          "unsupported dtype C64"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE_FILES))
def test_garbage_safetensors_are_one_clear_error(tmp_path, capsys, name):
  content, message = GARBAGE_FILES[name]
  path = tmp_path / "model.safetensors"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    sd.read_checkpoint_file(path)
  line = refused(capsys, "convert_checkpoint", f"--checkpoint={path}", f"--output={tmp_path / 'out'}",
                 unchanged=tmp_path)
  assert str(path) in line
  assert not (tmp_path / "out").exists()


def test_garbage_shard_index_and_torch_pickle(tmp_path, monkeypatch):
  index = tmp_path / "model.safetensors.index.json"
  index.write_text('{"weights": {}}')
  with pytest.raises(ValueError, match="is not a safetensors shard index"):
    sd.read_checkpoint_file(index)

  def load(*args, **kwargs):
    raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))  # torch's error for a garbage .pt
  (tmp_path / "lora.pt").write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"lora.pt is not a readable PyTorch checkpoint: PytorchStreamReader failed"):
    sd.read_checkpoint_file(tmp_path / "lora.pt")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
  header, blobs, offset = {}, [], 0
  for name, array in tensors.items():
    blob = np.ascontiguousarray(array, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  path.write_bytes(safetensors_bytes(header, b"".join(blobs)))
  return path


def test_a_lora_file_without_lora_weights_is_refused(tmp_path, capsys):
  no_lora = write_safetensors(tmp_path / "no_lora.safetensors", {"blocks.0.self_attn.q.weight": np.ones((64, 64))})
  expected = "expected tensors named '<module>.lora_A[.<adapter>].weight' and '<module>.lora_B[.<adapter>].weight'"
  with pytest.raises(ValueError, match="holds no LoRA weights") as error:
    sd.load_lora(no_lora)
  assert expected in str(error.value) and "blocks.0.self_attn.q.weight" in str(error.value)
  mixed = write_safetensors(tmp_path / "mixed.safetensors", {
      "blocks.0.self_attn.q.lora_A.weight": np.ones((2, 64)), "blocks.0.self_attn.q.lora_B.weight": np.ones((64, 2)),
      "blocks.0.self_attn.k.weight": np.zeros((64, 64))})
  with pytest.raises(ValueError, match=r"holds 1 tensors that are not LoRA weights, such as "
                                       r"\['blocks.0.self_attn.k.weight'\]: merging them would replace base weights"):
    sd.load_lora(mixed)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x00" * 3)
  for lora, message in ((no_lora, "holds no LoRA weights"), (garbage, "is not a .safetensors file")):
    line = refused(capsys, "convert_checkpoint", f"--checkpoint={ORIGINAL}", f"--lora={lora}", "--preset=tiny",
                   "--mode=dense", f"--output={tmp_path / 'out'}", unchanged=tmp_path)
    assert message in line and str(lora) in line
  assert not (tmp_path / "out").exists()


LAYOUTS = {  # fixture: (--kind, config, layout, library converter)
    "vae_tiny_diffusers": ("vae", VAEConfig.from_preset("tiny"), "diffusers", wan_vae.vae_params),
    "vae_tiny_original": ("vae", VAEConfig.from_preset("tiny"), "original", wan_vae.vae_params),
    "umt5_tiny_hf": ("text_encoder", TextEncoderConfig.from_preset("tiny"), "hf", umt5.text_encoder_params),
    "umt5_tiny_wan": ("text_encoder", TextEncoderConfig.from_preset("tiny"), "wan", umt5.text_encoder_params),
}


@pytest.mark.parametrize("fixture", sorted(LAYOUTS))
def test_convert_command_converts_every_vae_and_text_encoder_layout(tmp_path, capsys, fixture):
  kind, config, layout, to_params = LAYOUTS[fixture]
  source, output = FIXTURES / f"{fixture}.safetensors", tmp_path / "out"
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  assert run_script("convert_checkpoint", f"--kind={kind}", f"--checkpoint={source}",
                    f"--config={tmp_path / 'config.json'}", f"--output={output}") == 0
  record = checkpoints.read_record(output)
  assert capsys.readouterr().out.startswith(f"wrote {output} ({record.kind.value} from the {layout} layout, ")
  assert record.layout == layout and type(config).from_dict(record.config) == config
  restore = wan_vae.restore_vae if kind == "vae" else umt5.restore_text_encoder
  expected = sd.flatten(to_params(sd.load_state_dict(source), config))
  got = sd.flatten(nnx.to_pure_dict(nnx.state(restore(output), nnx.Param)))
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_checkpoints_get_normal_directory_permissions(tmp_path, umask):
  old = os.umask(umask)
  try:
    path = checkpoints.save_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)},
                                       checkpoints.CheckpointRecord(kind=checkpoints.Kind.VAE, config={}))
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_check_writable(tmp_path, monkeypatch):
  io.check_writable(tmp_path / "new" / "deeper")  # creates nothing
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    io.check_writable(tmp_path / "file" / "below")
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(PermissionError, match=f"no write permission in {tmp_path}"):
    io.check_writable(tmp_path / "new")


@pytest.mark.parametrize("case", ["converts", "refuses"])
def test_convert_command_line_output(tmp_path, case):
  """The real command line: a conversion prints one line and no log lines, and makes a normal (0755
  under umask 022) directory; bad input is exit code 2 and one stderr line."""
  source = FIXTURES / "vae_tiny_original.safetensors"
  if case == "refuses":
    source = tmp_path / "empty.safetensors"
    source.write_bytes(b"")
  output, config = tmp_path / "out", tmp_path / "vae.json"
  config.write_text(json.dumps(VAEConfig.from_preset("tiny").to_dict()))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "JAX_PLATFORMS": "cpu"}
  old = os.umask(0o022)
  try:
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "convert_checkpoint.py"), "--kind=vae",
                           f"--config={config}", f"--checkpoint={source}", f"--output={output}"],
                          capture_output=True, text=True, env=env)
  finally:
    os.umask(old)
  if case == "converts":
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"wrote {output} (wan_vae from the original layout, base_dim=4, z_dim=4)\n"
    assert output.stat().st_mode & 0o777 == 0o755
  else:
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {source} is not a .safetensors file: its 0 bytes cannot hold the header it " \
                          "announces (empty, truncated, or another format)\n"
    assert not output.exists()


# ---- experiments/eval_memory.py ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory) -> Path:
  """The finished run's export (a dense training export)."""
  export = tmp_path_factory.mktemp("export") / "dense"
  assert run_script("train", *TRAIN_FLAGS, f"--run_dir={finished_run}", "--steps=2", f"--export={export}") == 0
  return export


FAKE_IDS = np.arange(2 * 5 * 2 * 1 * 2 * 3 * 4).reshape(2, 5, 2, 1, 2, 3, 4)  # [chunks, calls, l, b, h, g, k]


def fake_result(path, mode, num_chunks, prefix, backends, kv_format, record_ids=False):
  """What `evaluate_mode` returns, without the evaluation: the compact formats' ids keep the first half of
  the bf16 ids' picks (fp8) or a quarter of them (int4), for each of two videos."""
  del num_chunks, prefix, backends
  summary = {"psnr_db": 20.0, "ssim": 0.5, "by_distance": {"12": {"psnr_db": 20.0}}}
  ids = FAKE_IDS.copy()
  ids[..., {"bf16": 4, "fp8": 2, "int4": 1}[kv_format]:] += 1000
  return ({"checkpoint": str(path), "mode": mode, "kv_format": kv_format, "window_frames": 9, "prefix": summary,
           "free": summary}, [ids, ids] if record_ids else [])


def test_eval_memory_without_matplotlib_writes_the_json_and_skips_the_plot(exported, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where the `plot` extra is not installed
  output = tmp_path / "bench.json"
  with script("eval_memory") as module:
    monkeypatch.setattr(module, "evaluate_mode", fake_result)
    assert call(module, f"--checkpoints=dense:{exported}", "--num_chunks=3", f"--output={output}") == 0
  captured = capsys.readouterr()
  assert captured.err == ("note: no plot: matplotlib is not installed (pip install 'omnimem-jax[plot]'); the JSON "
                          "is written\n")
  assert json.loads(output.read_text())["modes"]["dense"]["checkpoint"] == str(exported)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
  assert captured.out.endswith(f"wrote {output}\n")


def test_eval_memory_evaluates_omnimem_once_per_kv_format(exported, tmp_path, monkeypatch):
  """--kv_formats: the omnimem checkpoint once per store format (named omnimem, omnimem_fp8, ...); a baseline
  once, with its plain store."""
  output = tmp_path / "bench.json"
  with script("eval_memory") as module:
    monkeypatch.setattr(module, "evaluate_mode", fake_result)
    assert call(module, f"--checkpoints=omnimem:{DEMO_CHECKPOINT},dense:{exported}", "--kv_formats=bf16",
                "--kv_formats=fp8", "--kv_formats=int4", "--num_chunks=3", "--prefix_chunks=1", f"--output={output}",
                "--plot=none") == 0
  modes = json.loads(output.read_text())["modes"]
  assert {name: (result["mode"], result["kv_format"]) for name, result in modes.items()} == {
      "omnimem": ("omnimem", "bf16"), "omnimem_fp8": ("omnimem", "fp8"), "omnimem_int4": ("omnimem", "int4"),
      "dense": ("dense", "bf16")}
  assert modes["omnimem_fp8"]["picks_unchanged"]["fraction_unchanged"] == 0.5
  assert modes["omnimem_int4"]["picks_unchanged"]["fraction_unchanged"] == 0.25
  assert modes["omnimem_int4"]["picks_unchanged"]["picks"] == 2 * FAKE_IDS.size  # both videos
  assert "picks_unchanged" not in modes["omnimem"] and "picks_unchanged" not in modes["dense"]


def test_eval_memory_refuses_bad_checkpoints_before_evaluating(exported, dit_checkpoint, tmp_path, capsys,
                                                              monkeypatch):
  damaged = Path(shutil.copytree(exported, tmp_path / "damaged"))
  (damaged / "params" / "_METADATA").unlink()
  cases = [
      (f"dense:{exported},dense:{exported}", "--checkpoints lists dense twice"),
      (f"window:{exported}", f"--checkpoints window: {exported} holds a dense model"),
      (f"dense:{dit_checkpoint}", f"--checkpoints dense: {dit_checkpoint} is not an export of experiments/train.py"),
      (f"dense:{damaged}", "--checkpoints dense: .*params is unreadable \\(truncated or corrupted\\)"),
      (f"dense:{tmp_path / 'missing'}", "--checkpoints dense: .*missing is not an OmniMem-JAX checkpoint"),
      ("dense", "--checkpoints entry 'dense' must be mode:path"),
  ]
  with script("eval_memory") as module:
    monkeypatch.setattr(module, "evaluate_mode", lambda *args: pytest.fail("evaluated"))
    for checkpoints_flag, message in cases:
      before = snapshot(tmp_path)
      assert call(module, f"--checkpoints={checkpoints_flag}", f"--output={tmp_path / 'bench.json'}") == 2
      assert snapshot(tmp_path) == before
      line = error_line(capsys)
      assert re.search(message, line), (message, line)
    (tmp_path / "a_file").write_text("x")
    for flag, message in ((f"--output={tmp_path / 'a_file' / 'b.json'}", "a_file is a file, not a directory"),
                          (f"--output={tmp_path / 'bench.txt'}", "bench.txt must end in .json"),
                          ("--num_videos=0", "--num_videos must be >= 1, got 0")):
      before = snapshot(tmp_path)
      assert call(module, f"--checkpoints=dense:{exported}", "--plot=none", flag) == 2
      assert snapshot(tmp_path) == before and message in error_line(capsys)


def test_eval_memory_takes_the_codec_a_checkpoint_was_trained_through(exported, tmp_path, capsys, monkeypatch):
  """A checkpoint trained on the codec-encoded pixel world (assets/demo/omnimem, through assets/demo/vae) is
  refused with a --codec that is not a codec, before any evaluation, and accepted with its codec."""
  demo = ROOT / "assets" / "demo"
  output = tmp_path / "bench.json"
  with script("eval_memory") as module:
    monkeypatch.setattr(module, "evaluate_mode", fake_result)
    assert call(module, f"--checkpoints=omnimem:{demo / 'omnimem'}", f"--codec={exported}", f"--output={output}",
                "--plot=none") == 2
    line = error_line(capsys)
    assert "trained on the world encoded by the codec assets/demo/vae, and --codec=" in line, line
    assert line.endswith("point --codec at that codec") and not output.exists()
    assert call(module, f"--checkpoints=omnimem:{demo / 'omnimem'}", f"--codec={demo / 'vae'}", f"--output={output}",
                "--plot=none", "--num_chunks=3", "--prefix_chunks=1") == 0
  assert json.loads(output.read_text())["modes"]["omnimem"]["checkpoint"] == str(demo / "omnimem")


def test_eval_memory_refuses_weights_damaged_past_the_metadata(exported, tmp_path, capsys):
  damaged = Path(shutil.copytree(exported, tmp_path / "damaged"))
  truncate_arrays(damaged)
  line = refused(capsys, "eval_memory", f"--checkpoints=dense:{damaged}", "--plot=none",
                 f"--output={tmp_path / 'bench.json'}", unchanged=tmp_path)
  assert line.startswith(f"error: --checkpoints dense: cannot restore {damaged / 'params'} (truncated, corrupted")


def test_robust_train_codec_flags_are_checked_before_training(tmp_path, capsys):
  """--codec: a missing codec, one without a recorded training world, or world flags beside it."""
  flags_ = [flag for flag in TRAIN_FLAGS if not flag.startswith(("--world_width", "--speed"))]
  run_dir = f"--run_dir={tmp_path / 'run'}"
  line = refused(capsys, "train", *flags_, run_dir, f"--codec={tmp_path / 'none'}", unchanged=tmp_path)
  assert f"{tmp_path / 'none'} is not an OmniMem-JAX checkpoint" in line
  converted = wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_diffusers.safetensors", tmp_path / "vae",
                                         VAEConfig.from_preset("tiny"))
  line = refused(capsys, "train", *flags_, run_dir, f"--codec={converted}", unchanged=tmp_path)
  assert "records no training world (not made by experiments/train_codec.py)" in line
  line = refused(capsys, "train", *flags_, run_dir, f"--codec={converted}", "--world_width=64", unchanged=tmp_path)
  assert "--world_width / --speed come from the codec's record with --codec; drop them" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--latent_frames=1",), "--latent_frames must be >= 2, got 1"),
    (("--kl_weight=-1",), "--kl_weight >= 0"),
    (("--steps=0",), "--steps must be >= 1, got 0"),
    (("--time_budget_s=-3",), "--time_budget_s must be > 0"),
    (("--start=/nonexistent/codec",), "--start=/nonexistent/codec is not a directory"),
])
def test_robust_train_codec_refuses_bad_flags(tmp_path, capsys, args, message):
  assert message in refused(capsys, "train_codec", f"--export={tmp_path / 'codec'}", *args, unchanged=tmp_path)
  assert not (tmp_path / "codec").exists()


def test_robust_train_codec_refuses_a_start_of_another_architecture(tmp_path, capsys):
  converted = wan_vae.convert_checkpoint(FIXTURES / "vae_tiny_diffusers.safetensors", tmp_path / "vae",
                                         VAEConfig.from_preset("tiny"))
  line = refused(capsys, "train_codec", f"--export={tmp_path / 'codec'}", f"--start={converted}", unchanged=tmp_path)
  assert line.startswith(f"error: --start={converted}: {converted} is a codec of {{'base_dim': ")
  assert "not of the architecture trained here" in line
  assert not (tmp_path / "codec").exists()


def test_robust_train_codec_never_replaces_an_export(tmp_path, capsys):
  (tmp_path / "codec").mkdir()
  (tmp_path / "codec" / "keep").write_text("mine")
  line = refused(capsys, "train_codec", f"--export={tmp_path / 'codec'}", unchanged=tmp_path)
  assert line == f"error: --export={tmp_path / 'codec'} already exists; remove it or pick another path"

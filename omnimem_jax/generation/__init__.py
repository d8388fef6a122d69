"""Text (or text embeddings) in, long mp4 out: the logic behind `experiments/generate.py`.

Two phases, so that bad input fails fast and cheaply:

  from omnimem_jax.generation import plan, run
  validated = plan.plan(GenerateOptions(...))  # validates everything: reads only JSON records, the
                                               # text-embeddings .npy and the prompt file; GenerateError if bad
  report = run.run(validated)                  # loads weights, encodes prompts, rolls out chunk by
                                               # chunk, decodes each chunk as it arrives, writes files

One job per module:
  options  what the user asks for (`GenerateOptions`, `PromptSwitch`) and the error type
  plan     validation and planning: everything checked before heavy work (`Plan`, `plan`)
  run      loading, the rollout loop, decoding, writing (`run`, `generate` = plan + run)
  report   the JSON run report (versions, device, backends, timing, retrieval) and progress lines

`run` streams: every chunk is decoded (Wan VAE, or a latent visualisation without one) and appended
to the mp4 as soon as the DiT produces it; a progress line per chunk goes to stderr (end-to-end FPS
first); a chunk with NaN or inf latents stops the run (`rollout.NonFiniteLatentsError`). Every output is
written through `omnimem_jax.io` (a temporary name renamed into place), so an existing file is never
left half written. Without a DiT checkpoint the run uses random weights of a preset: a smoke run,
labelled as such on stdout and in the JSON report, that tests the pipeline and not the pictures.
"""

"""Image models (diffusers pipelines: FLUX.1, SD3, SDXL): DreamBooth-style LoRA with the EMLoC method.

Stages (each ``function(config, progress) -> result``): :mod:`.dataset` (scan an image folder),
:mod:`.pipelines` (identify and load a pipeline folder), :mod:`.cache` (encode images and captions
once), :mod:`.emulator` (activation-aware SVD of the denoiser), :mod:`.training` (LoRA on the
emulator), :mod:`.correction` (move the adapter onto the original) and :mod:`.run` (all of them,
resumable). ``diffusers`` is an optional dependency (the ``images`` extra); only the modules that
need it import it, inside functions. :mod:`.options` (the run's settings and result), :mod:`.dataset`
and :mod:`.export` import neither torch nor diffusers: the app and the CLI read them at start-up and
import the stage modules when a stage runs.
"""

"""The stages of a speech run (``data.name`` a speech source), in the names a config's
``stages`` lists: ``stages.run`` dispatches here instead of to the image stages.

Each takes ``(config, workdir, mesh)``; what they do is in ``audio/tts.py`` (codec, tokens,
generator), ``audio/synthesis.py`` and ``audio/evaluation.py`` (the zero-shot tasks). A
table of its own keeps the imports one-way: evaluation synthesises through synthesis, which
loads the trained run through tts.
"""

from __future__ import annotations

from typing import Callable, Dict

from resgen_jax.audio import evaluation, synthesis, tts

STAGES: Dict[str, Callable] = {
    "tokenizer": tts.run_codec, "encode": tts.run_encode, "generator": tts.run_generator,
    "synthesize": synthesis.run_synthesize, "evaluate": evaluation.run_evaluate}

"""Zero-shot TTS evaluation (the ``evaluate`` stage of speech runs): the paper's two tasks on
the eval split, whose speakers the generator never heard, exported in the layout of the
common zero-shot TTS evaluation scripts, with offline proxies that need no download.

The eval split's utterances are grouped by speaker (sorted by uid). In every speaker's list
the even positions are *targets* and the odd ones *references*: the prompts of the
cross-sentence task and the training data of the speaker classifier.

* ``continuation``: the prompt is the first ``evaluation.tts_prompt_seconds`` of a target
  (its own tokens), the text its whole transcript, the length its true length. The exported
  WAV is prompt + continuation (scored against the whole transcript); the mel-cepstral
  distortion compares the continuation with the real rest of the utterance.
* ``cross_sentence``: the prompt is a reference of the same speaker (a speaker's k-th target
  takes its k-th reference, cyclically), the text the reference's transcript then the
  target's, the length from the prompt's speaking rate (:func:`synthesis.make_request`). The
  exported WAV is the generated target alone.

Layout under ``DIR/tts_eval/<tag>/<task>/``:

  ``wavs/<uid>.wav``: generated speech; ``prompts/<uid>.wav``: the prompt; ``gt/<uid>.wav``:
  the real target.
  ``meta.lst``: ``uid|prompt_text|prompts/<uid>.wav|target_text|gt/<uid>.wav`` per line (the
  seed-tts-eval list format, ``utt|prompt_text|prompt_wav|infer_text|infer_wav``); WER (with
  a CTC ASR model) and speaker similarity (with a verification model) are computed by those
  scripts with the user's own weights.

and ``DIR/tts_eval/<tag>/results.json`` with, per task: ``mcd_db`` (continuation),
``duration_ratio`` (cross-sentence: generated over real target duration), the accuracy of a
speaker classifier trained by the project on the references' real audio, and for the
closed-vocabulary ``espeak`` corpus the word F1 of a word classifier trained on the train
split (cross-sentence), each beside the same number for the real targets; and the
real-time factor of synthesis.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Dict, List

import jax
import numpy as np

from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import corpus, distortion, frontend, speech_classifier, speech_tokens
from resgen_jax.audio import synthesis, tts
from resgen_jax.audio import text as text_lib
from resgen_jax.utils import files

EVAL_DIR = "tts_eval"
CLASSIFIER_DIR = "evaluation"
TASKS = ("continuation", "cross_sentence")


def eval_tag(config) -> str:
  """The evaluation set's name: the main sampler settings plus a hash of every sampler and
  TTS-evaluation setting, so a changed setting makes a new set."""
  ecfg = config.evaluation
  settings = {"sampler": config.sampler.to_dict(),
              "evaluation": {k: ecfg[k] for k in ("tts_prompt_seconds", "tts_max_utterances",
                                                  "tts_classifier_steps")}}
  scfg = config.sampler
  return (f"T{scfg.steps}_cfg{scfg.cfg_scale:g}_temp{scfg.temperature:g}_"
          f"{files.settings_hash(settings)}")


def split_roles(utterances: List[corpus.Utterance]):
  """``(targets, references)``: index lists, even / odd positions of each speaker's
  uid-sorted utterances; and ``prompt_of``: target index -> its cross-sentence reference."""
  by_speaker = collections.defaultdict(list)
  for i, u in enumerate(utterances):
    by_speaker[u.speaker].append(i)
  targets, references, prompt_of = [], [], {}
  for speaker in sorted(by_speaker):
    ordered = sorted(by_speaker[speaker], key=lambda i: utterances[i].uid)
    mine, refs = ordered[0::2], ordered[1::2]
    targets += mine
    references += refs
    for k, i in enumerate(mine):
      if refs:
        prompt_of[i] = refs[k % len(refs)]
  return targets, references, prompt_of


def prompt_frames(config, codec) -> int:
  """Token frames of the continuation prompt (``evaluation.tts_prompt_seconds``)."""
  seconds = config.evaluation.tts_prompt_seconds
  if seconds <= 0:
    raise ValueError(f"evaluation.tts_prompt_seconds must be > 0, got {seconds}")
  samples_per_frame = codec.downsample * config.audio.hop_length
  return max(1, int(round(seconds * config.audio.sample_rate / samples_per_frame)))


def continuation_requests(config, utterances, codes, targets, codec, num_positions, tokenizer):
  """Requests (and target indices) of the continuation task; targets too short to continue
  after the prompt, or too long for the model, are left out."""
  prompt = prompt_frames(config, codec)
  out = []
  for i in targets:
    length = codes[i].shape[0]
    text = text_lib.normalize_text(utterances[i].text)
    if prompt < length <= num_positions and len(tokenizer.encode(text)) <= config.text.max_length:
      out.append((i, synthesis.Request(utterances[i].uid, codes[i][:prompt], text,
                                       length - prompt)))
  return out


def cross_sentence_requests(config, utterances, codes, targets, prompt_of, codec,
                            num_positions, tokenizer):
  """Requests (and target indices) of the cross-sentence task; pairs that exceed the
  model's limits are left out."""
  out = []
  for i in targets:
    if i not in prompt_of:
      continue
    ref = prompt_of[i]
    try:
      request = synthesis.make_request(utterances[i].uid, codes[ref], utterances[ref].text,
                                 utterances[i].text, tokenizer, num_positions,
                                 config.text.max_length, codec, config.audio)
    except ValueError as e:
      logging.info("cross-sentence: %s left out (%s)", utterances[i].uid, e)
      continue
    out.append((i, request))
  return out


def speaker_classifier(config, workdir, utterances, references, mels):
  speakers = sorted({utterances[i].speaker for i in references})
  index = {s: k for k, s in enumerate(speakers)}
  path = os.path.join(workdir, CLASSIFIER_DIR,
                      f"tts_speakers_{config.evaluation.tts_classifier_steps}steps.msgpack")
  load = lambda: ([mels[i] for i in references],
                  np.asarray([index[utterances[i].speaker] for i in references]))
  classifier = speech_classifier.get_or_train(
      path, load, "speaker", len(speakers), config.audio.n_mels, speakers,
      num_steps=config.evaluation.tts_classifier_steps, seed=config.seed)
  return classifier, index


def word_classifier(config, workdir):
  """The closed-vocabulary word classifier (``espeak`` only), trained on the train split."""
  vocabulary = corpus.vocabulary()
  path = os.path.join(workdir, CLASSIFIER_DIR,
                      f"tts_words_{config.evaluation.tts_classifier_steps}steps.msgpack")

  def load():
    utterances, mels = tts.split_mels(config, config.data.train_split)
    return mels, speech_classifier.word_targets([u.text for u in utterances], vocabulary)

  classifier = speech_classifier.get_or_train(
      path, load, "words", len(vocabulary), config.audio.n_mels, vocabulary,
      num_steps=config.evaluation.tts_classifier_steps, seed=config.seed)
  return classifier, vocabulary


def export_task(task_dir: str, rows: List[dict], sample_rate: int) -> None:
  """Writes the WAVs and ``meta.lst`` of one task (``meta.lst`` last)."""
  lines = []
  for row in rows:
    uid = row["uid"]
    for sub, wave in (("wavs", row["generated"]), ("prompts", row["prompt"]),
                      ("gt", row["gt"])):
      frontend.write_wav(os.path.join(task_dir, sub, f"{uid}.wav"), wave, sample_rate)
    fields = (uid, row["prompt_text"], f"prompts/{uid}.wav", row["target_text"],
              f"gt/{uid}.wav")
    if any("|" in f or "\n" in f for f in fields):
      raise ValueError(f"{uid}: a field holds '|' or a newline, which meta.lst cannot hold")
    lines.append("|".join(fields))
  with files.atomic_write(os.path.join(task_dir, "meta.lst")) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


def run_evaluate(config, workdir: str, mesh) -> Dict:
  """Runs both tasks, exports them and writes ``results.json`` once (an existing one is
  kept and returned)."""
  out_dir = os.path.join(workdir, EVAL_DIR, eval_tag(config))
  results_path = os.path.join(out_dir, tts.RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as f:
      return json.load(f)
  codec, codec_state, task, state, tokenizer = tts.load_generator(config, workdir, mesh)
  utterances, mels = tts.split_mels(config, config.data.eval_split)
  cached = speech_tokens.load_speech_tokens(workdir, config.data.eval_split)
  if list(cached["uids"]) != [u.uid for u in utterances]:
    raise ValueError(f"the cached {config.data.eval_split} tokens in {workdir} are not those "
                     f"of this corpus; remove "
                     f"{os.path.dirname(speech_tokens.meta_path(workdir))} and encode again")
  codes = [c[:n].astype(np.int32) for c, n in zip(cached["codes"], cached["lengths"])]
  targets, references, prompt_of = split_roles(utterances)
  limit = config.evaluation.tts_max_utterances or None
  requests = {
      "continuation": continuation_requests(config, utterances, codes, targets, codec,
                                            task.num_positions, tokenizer)[:limit],
      "cross_sentence": cross_sentence_requests(config, utterances, codes, targets, prompt_of,
                                                codec, task.num_positions,
                                                tokenizer)[:limit]}
  if not any(requests.values()):
    raise ValueError(f"no {config.data.eval_split} utterance can be evaluated: each task "
                     f"needs targets longer than the prompt that fit the model")
  speakers, speaker_index = speaker_classifier(config, workdir, utterances, references, mels)
  words = word_classifier(config, workdir) if config.data.name == "espeak" else None
  synthesizer = synthesis.Synthesizer(config, codec, codec_state, task, state, tokenizer, mesh,
                                config.synth.batch_size)
  sr, samples_per_frame = config.audio.sample_rate, codec.downsample * config.audio.hop_length
  report = {"eval_split": config.data.eval_split, "tag": eval_tag(config)}
  for name, pairs in requests.items():
    if not pairs:
      continue
    start = time.time()
    outputs = synthesizer([r for _, r in pairs])
    seconds = time.time() - start
    rows, real_rests, ratios = [], [], []
    for (i, request), out in zip(pairs, outputs):
      u = utterances[i]
      if name == "continuation":
        split_at = request.prompt_codes.shape[0] * samples_per_frame
        prompt_wave, exported = u.wave[:split_at], out.wave
        prompt_text = ""  # the words of the first seconds are not known apart
        real_rests.append(u.wave[split_at:])
      else:
        ref = utterances[prompt_of[i]]
        prompt_wave, exported, prompt_text = ref.wave, out.generated, ref.text
        ratios.append(distortion.duration_ratio(len(out.generated), len(u.wave)))
      rows.append(dict(uid=u.uid, generated=exported, prompt=prompt_wave, gt=u.wave,
                       prompt_text=prompt_text, target_text=u.text))
    # One log-mel pass over all generated (and real continuation) speech of the task.
    generated_mels = codec_lib.utterance_mels([o.generated for o in outputs], config.audio)
    real_mels = [mels[i] for i, _ in pairs]
    mcd = [distortion.mel_cepstral_distortion(real, gen) for real, gen in zip(
        codec_lib.utterance_mels(real_rests, config.audio), generated_mels)]
    result = {"num_utterances": len(pairs),
              "real_time_factor": seconds / (sum(len(o.generated) for o in outputs) / sr)}
    if mcd:
      result["mcd_db"] = float(np.mean(mcd))
    if ratios:
      result["duration_ratio"] = float(np.mean(ratios))
    labels = np.asarray([speaker_index.get(utterances[i].speaker, -1) for i, _ in pairs])
    if np.all(labels >= 0):
      result["speaker_accuracy"] = {
          "generated": speech_classifier.score(speakers, generated_mels, labels),
          "real": speech_classifier.score(speakers, real_mels, labels)}
    if words is not None and name == "cross_sentence":
      classifier, vocabulary = words
      truth = speech_classifier.word_targets([utterances[i].text for i, _ in pairs], vocabulary)
      result["word_f1"] = {"generated": speech_classifier.score(classifier, generated_mels, truth),
                           "real": speech_classifier.score(classifier, real_mels, truth)}
    if jax.process_index() == 0:
      export_task(os.path.join(out_dir, name), rows, sr)
    report[name] = result
    logging.info("tts %s: %s", name, json.dumps(result))
  if jax.process_index() == 0:
    files.save_json(results_path, report)
  return report

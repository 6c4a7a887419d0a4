"""Audio front end of zero-shot text-to-speech: log-mel features, inversion, WAV files."""

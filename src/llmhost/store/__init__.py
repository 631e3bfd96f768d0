"""Where models come from: the embedded default now; the local store and hub pulls later."""

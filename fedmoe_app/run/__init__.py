"""One run of the app: its outputs (metrics, plots), checkpoints and the ServerApp's main loop.

Import the modules explicitly: :mod:`.checkpoint`, :mod:`.files` and :mod:`.results` need
numpy only (tools read run folders without torch or Flower); :mod:`.server` runs the job.
"""

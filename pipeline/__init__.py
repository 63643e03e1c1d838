"""ECG Audio Analyzer's analysis pipeline: pure library code, one module per stage.

Nothing here imports Ray or FastAPI, and nothing loads a model at import time:
`pipeline.analyzer.Analyzer` (or a Serve deployment) owns the models.
"""

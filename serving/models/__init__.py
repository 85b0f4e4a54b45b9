"""The Python-backend models that `serving.repository` copies into a model repository.

jump.py, sampler.py and stream.py each become `<model>/1/model.py`; they import
`serving.models.common` (shared BLS and request code) and `serving.protocol`, so the
project must be importable by the Triton stub (the launcher sets PYTHONPATH).
"""

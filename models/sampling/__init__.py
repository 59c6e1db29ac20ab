"""Cached (incremental) samplers of the autoregressive models: :mod:`.cached` drives the raster
order, the draws and cancellation once; :mod:`.pixelcnn` and :mod:`.pixelrnn` keep each model's
layer state. The models import these; nothing here imports a model module."""

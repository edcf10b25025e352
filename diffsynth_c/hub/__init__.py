"""Model downloads, the engine under ``loader.config.ModelConfig``: the hubs' listings (``hubs``),
the model folder's manifest and lock (``manifest``) and the transfers (``transfer``)."""

"""The bottom layer's helpers that had lived in ``loader/``: the environment settings
(``settings``), the C core's dtype conversions (``conversion``), the torch checkpoint reader
(``torchfile``) and which format a file is (``formats``). They use nothing of the package above them (the C core, ``dlpack`` and
``kernels`` aside, which are bottom-layer modules too but keep their public paths
``diffsynth_c.dlpack`` and ``diffsynth_c.kernels``). Their old paths under ``loader/`` still work."""

"""``import diffsynth_c.auto``: patches an installed DiffSynth to load through diffsynth_c."""

from .patch import patch_diffsynth

patch_diffsynth()

"""Small plain-Python helpers every room uses once: atomic files, seeds, devices, progress bars.

No Lightning and no Hydra here (a test checks it), so the plain-torch library can use them.
"""

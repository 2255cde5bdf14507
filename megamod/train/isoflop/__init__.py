"""isoFLOP and scaling-law sweeps of ordinary megamod runs (``tools/isoflop.py``): ``plan``
writes a manifest, ``runner`` executes it resumably, ``results`` turns run directories into the
results table, ``fit`` and ``plots`` analyse it."""

"""Anchors: the per-class banks of CLIP image features and their centres, and the cache file that holds them
(bank.py); which image is which class's and their CLIP features (images.py); a run's cache, loaded or built from the
images, and the command that builds one (build.py: python -m vega_utils.anchors.build)."""

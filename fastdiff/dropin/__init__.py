"""Drop-in replacements for diffusers' scheduler classes: thin adapters over the one step
(public face: fastdiff.diffusers)."""

"""The toy world: procedural captioned images, base models trained on them, detectors, measures.

world.py (images and captions), autoencoder.py, diffusion.py and detector.py (the models, trained
by build.py into a ComfyUI install), quality.py (figures through ComfyUI's own nodes).
"""

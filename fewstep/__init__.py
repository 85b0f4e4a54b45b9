"""fewstep: few-step image generation, trained to served."""
__version__ = "0.1.0"

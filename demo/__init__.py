"""The Gradio demo (`fewstep demo`): a page that talks to Triton over gRPC, and its default models."""

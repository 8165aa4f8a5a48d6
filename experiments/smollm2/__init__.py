"""SmolLM2-135M-Instruct linearised and measured the paper's way (the project's main job)."""

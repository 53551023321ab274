"""The built-in demo: the trained shapes LLaVA checkpoint (`shapes-llava/`), its task and its training."""

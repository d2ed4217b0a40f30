"""One runner per ``task=`` choice: ``run(cfg, out_dir) -> dict`` of final metrics."""

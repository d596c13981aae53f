"""vitexp's Hydra configs, shipped inside the package as `vitexp.conf` (Hydra's pkg://vitexp.conf)."""

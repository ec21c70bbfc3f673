"""lightning_selfcompress's Hydra sweeper: random search over intervals (see `random_sweeper`)."""

"""Neural-network plumbing shared by statistics, conditioning and reproduce: models, data, evaluation."""

"""Sample-quality and likelihood evaluation: FID / IS math, feature networks, offline metrics."""

"""What the tests share: the relay launcher, origins, raw-socket helpers, the /metrics scraper."""

"""The elastic-domains page's example: a guest program that waits for a disk to come."""

"""The guest-programs page's example: a guest program that uses its disk."""

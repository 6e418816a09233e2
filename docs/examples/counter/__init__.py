"""The guest-programs page's resumable example: a program whose count survives a save."""

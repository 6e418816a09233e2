"""`python -m xenlike.xenstore --socket PATH`: run xenstored alone."""

from xenlike.xenstore.server import main

main()
